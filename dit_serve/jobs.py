"""Job records: the Redis keys, states and fields shared by the API and the workers.

A job is an RQ job (`rq:job:<id>`, queue `rq:queue:<queue>`, RQ's registries), so `rq info` and
rq-dashboard show it. RQ keeps its lifecycle status; what RQ has no place for (the normalised
request, progress, outputs, error, cancel flag) lives in our own hash `dit:job:<id>`.
"""

import json
import time
from collections.abc import Mapping
from enum import StrEnum

from pydantic import BaseModel, ConfigDict

from dit_serve.contract import SCHEMA_VERSION, JobKind, JobRequest, JobTooNewError, too_new

KEY_PREFIX = "dit"
# What RQ would call if a stock `rq worker` took one of our jobs: it explains itself and fails.
TASK_FUNCTION = "worker.rq_task.run"


class JobStatus(StrEnum):
    QUEUED = "queued"
    IN_PROGRESS = "in_progress"
    COMPLETED = "completed"
    FAILED = "failed"
    CANCELED = "canceled"


ENDED_STATUSES = frozenset({JobStatus.COMPLETED, JobStatus.FAILED, JobStatus.CANCELED})

# RQ's job statuses (rq.job.JobStatus values) as the API reports them.
STATUS_FROM_RQ = {
    "queued": JobStatus.QUEUED,
    "deferred": JobStatus.QUEUED,
    "scheduled": JobStatus.QUEUED,
    "created": JobStatus.QUEUED,
    "started": JobStatus.IN_PROGRESS,
    "finished": JobStatus.COMPLETED,
    "failed": JobStatus.FAILED,
    "stopped": JobStatus.CANCELED,
    "canceled": JobStatus.CANCELED,
}


class RecordField(StrEnum):
    """Fields of the `dit:job:<id>` hash (the Lua scripts in worker/queue.py and queueing.py use them too)."""

    SCHEMA_VERSION = "schema_version"  # of the request: an older worker leaves a newer job alone
    KIND = "kind"
    MODEL = "model"
    REQUEST = "request"  # JSON: the JobRequest
    COMPAT = "compat"  # jobs with equal compat keys can share one denoising loop
    SAMPLES = "samples"  # how many rows the job adds to a batch (n)
    CREATED_AT = "created_at"
    STARTED_AT = "started_at"
    COMPLETED_AT = "completed_at"
    PROGRESS = "progress"
    STEP = "step"  # denoising steps done (of the request's num_inference_steps), for the ETA
    OUTPUTS = "outputs"  # JSON list of OutputRecord
    ERROR = "error"  # JSON JobError
    CANCEL = "cancel"  # "1" when a client asked to cancel a running job
    EXECUTION = "execution"  # id of the batch run that holds the job now
    WORKER = "worker"
    ATTEMPTS = "attempts"
    DEADLINE = "deadline"  # unix time by which the job must have started (queue_timeout_s), if any
    OWNER = "owner"  # name of the API key that created the job; absent when auth was off
    PRIORITY = "priority"  # the request's priority class, for the scheduler (dit_serve/scheduling.py)
    # Poison isolation (dit_serve/reaping.py): how many jobs the sampling run that holds the job has
    # (1: it runs alone; 0: held, waiting for its turn), how many times a worker died holding it, and
    # "1" when it may only be taken alone (it was held by two dead workers, or timed out in a batch).
    BATCH_JOBS = "batch_jobs"
    DEATHS = "deaths"
    SOLO = "solo"


def rq_timestamp(unix: float | None = None) -> str:
    """The UTC timestamp format RQ stores in job hashes."""
    unix = time.time() if unix is None else unix
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(unix)) + f".{int(unix % 1 * 1e6):06d}Z"


def record_key(job_id: str) -> str:
    return f"{KEY_PREFIX}:job:{job_id}"


def rq_job_key(job_id: str) -> str:
    return f"rq:job:{job_id}"


def queue_name(model: str) -> str:
    """One RQ queue per model; colons are not allowed because RQ splits registry members on them."""
    return f"dit-serve.{model}"


def ended_key(job_id: str) -> str:
    """A list that gets an entry when a job ends, so `GET /v1/jobs/{id}?wait=` can block on it."""
    return f"{KEY_PREFIX}:ended:{job_id}"


def wake_key(queue: str) -> str:
    """A list the API pushes to after an enqueue, so idle workers block on it instead of polling."""
    return f"{KEY_PREFIX}:wake:{queue}"


class JobError(BaseModel):
    """Why a job failed: a stable code and a message that says what to do."""

    model_config = ConfigDict(frozen=True)

    code: str
    message: str


class OutputRecord(BaseModel):
    """One stored output of a completed job."""

    model_config = ConfigDict(frozen=True)

    index: int
    content_type: str
    width: int
    height: int
    seed: int
    bytes: int
    key: str  # where the storage backend keeps it
    num_frames: int | None = None  # videos only


class JobRecord(BaseModel):
    """A job's `dit:job:<id>` hash, typed: written by the API, advanced by workers, read by both."""

    model_config = ConfigDict(frozen=True)

    schema_version: int = SCHEMA_VERSION
    request: JobRequest
    created_at: float
    started_at: float | None = None
    completed_at: float | None = None
    progress: int = 0
    step: int = 0  # denoising steps done
    outputs: list[OutputRecord] = []
    error: JobError | None = None
    cancel: bool = False
    execution: str | None = None
    worker: str | None = None
    attempts: int = 0
    owner: str | None = None  # the creating API key's name; None when auth is off
    deaths: int = 0  # how many times a worker died while holding the job
    solo: bool = False  # taken only alone from now on

    @property
    def kind(self) -> JobKind:
        return self.request.kind

    @property
    def model(self) -> str:
        return self.request.model

    @property
    def deadline(self) -> float | None:
        """Unix time by which the job must have started, when it has a queue_timeout_s."""
        timeout = self.request.queue_timeout_s
        return self.created_at + timeout if timeout is not None else None

    @classmethod
    def new(cls, request: JobRequest, owner: str | None = None) -> "JobRecord":
        return cls(
            schema_version=request.schema_version, request=request, created_at=time.time(), owner=owner
        )

    def creation_fields(self) -> dict[str, str]:
        """The hash fields the API writes when it accepts the job."""
        fields: dict[str, str] = {
            RecordField.SCHEMA_VERSION: str(self.schema_version),
            RecordField.KIND: self.kind.value,
            RecordField.MODEL: self.model,
            RecordField.REQUEST: self.request.to_json(),
            RecordField.COMPAT: self.request.compat,
            RecordField.SAMPLES: str(self.request.n),
            RecordField.PRIORITY: self.request.priority.value,
            RecordField.CREATED_AT: repr(self.created_at),
            RecordField.PROGRESS: "0",
        }
        if self.owner is not None:
            fields[RecordField.OWNER] = self.owner
        if self.deadline is not None:
            fields[RecordField.DEADLINE] = repr(self.deadline)
        return fields

    @classmethod
    def from_hash(cls, raw: Mapping[bytes, bytes]) -> "JobRecord":
        """Parse the hash as Redis returns it; JobTooNewError when a newer dit-serve wrote it."""
        fields = {key.decode(): value.decode() for key, value in raw.items()}
        version = int(fields.get(RecordField.SCHEMA_VERSION, SCHEMA_VERSION))
        if version > SCHEMA_VERSION:
            raise JobTooNewError(too_new(version))

        def number(field: RecordField) -> float | None:
            return float(fields[field]) if fields.get(field) else None

        return cls(
            schema_version=version,
            request=JobRequest.from_json(fields[RecordField.REQUEST]),
            created_at=number(RecordField.CREATED_AT) or 0.0,
            started_at=number(RecordField.STARTED_AT),
            completed_at=number(RecordField.COMPLETED_AT),
            progress=int(fields.get(RecordField.PROGRESS) or 0),
            step=int(fields.get(RecordField.STEP) or 0),
            outputs=[OutputRecord.model_validate(o) for o in _json_list(fields.get(RecordField.OUTPUTS))],
            error=JobError.model_validate_json(fields[RecordField.ERROR])
            if RecordField.ERROR in fields
            else None,
            cancel=fields.get(RecordField.CANCEL) == "1",
            execution=fields.get(RecordField.EXECUTION),
            worker=fields.get(RecordField.WORKER),
            attempts=int(fields.get(RecordField.ATTEMPTS) or 0),
            owner=fields.get(RecordField.OWNER),
            deaths=int(fields.get(RecordField.DEATHS) or 0),
            solo=fields.get(RecordField.SOLO) == "1",
        )


def _json_list(value: str | None) -> list:
    return json.loads(value) if value else []


def outputs_json(outputs: list[OutputRecord]) -> str:
    return "[" + ",".join(output.model_dump_json() for output in outputs) + "]"


# Error codes a worker fails a job with (a job's `error.code`).
SAMPLING_FAILED = "sampling_failed"
STORAGE_FAILED = "storage_failed"
LORA_UNAVAILABLE = "lora_unavailable"  # an adapter the job names was removed, or its weights are unreadable
INVALID_JOB = "invalid_job"  # a record this worker cannot read (damaged); a newer one is left queued
NO_WORKER = "no_worker"  # failed by the reaper: no live worker has served its model for too long
QUEUE_TIMEOUT = "queue_timeout"  # not started within the request's queue_timeout_s
TIMEOUT = "timeout"  # ran past its ceiling (DIT_JOB_TIMEOUT_S scaled by its cost) while it ran alone
WORKER_LOST_CODE = "worker_lost"

# What a client is told when a worker fails its job: a fixed message per code that says what to do.
# Never the exception's text, the host, the worker or its pid: the worker logs those with the job id.
SAMPLING_FAILED_ERROR = JobError(
    code=SAMPLING_FAILED,
    message=(
        "sampling failed for this request; it was logged on the worker with the job id. Retry, or "
        "change num_inference_steps/size if it keeps failing"
    ),
)
STORAGE_FAILED_ERROR = JobError(
    code=STORAGE_FAILED,
    message=(
        "the outputs were generated but could not be stored; it was logged on the worker with the "
        "job id. Retry later; if it keeps failing, the operator should check the output storage"
    ),
)
LORA_UNAVAILABLE_ERROR = JobError(
    code=LORA_UNAVAILABLE,
    message=(
        "a LoRA adapter this job names could not be loaded: it was removed after the job was accepted, "
        "or its stored weights are unreadable (logged on the worker with the job id). Check GET /v1/models "
        "for the model's adapters and submit the request again"
    ),
)
INVALID_JOB_ERROR = JobError(
    code=INVALID_JOB,
    message=(
        "the worker could not read this job's stored request; it was logged on the worker with the "
        "job id. Submit the request again"
    ),
)

TIMEOUT_ERROR = JobError(
    code=TIMEOUT,
    message=(
        "the job ran alone past its time limit (DIT_JOB_TIMEOUT_S, scaled by its steps, size, frames "
        "and outputs), so its worker was restarted; it was logged on the worker with the job id. Retry "
        "with fewer steps, a smaller size or fewer frames; if it keeps happening, the operator should "
        "check the worker's device or raise DIT_JOB_TIMEOUT_S"
    ),
)

# Failed by the reapers (dit_serve/reaping.py); also what the API shows for a job RQ's own abandoned-job
# cleanup failed, which writes no error record.
WORKER_LOST = JobError(
    code=WORKER_LOST_CODE,
    message=(
        "the worker running this job stopped (crashed or was killed) while the job ran alone, and the "
        "job had no retries left: the job itself may be what stops it. Retry it, with other "
        "parameters if it fails again; the operator can find the worker's last log lines by the job id"
    ),
)
