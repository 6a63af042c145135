"""Job records: the Redis keys, states and fields shared by the API and the workers.

A job is an RQ job (`rq:job:<id>`, queue `rq:queue:<queue>`, RQ's registries), so `rq info` and
rq-dashboard show it. RQ keeps its lifecycle status; what RQ has no place for (the normalised
request, progress, outputs, error, cancel flag) lives in our own hash `dit:job:<id>`.
"""

import json
from dataclasses import dataclass
from enum import StrEnum
from typing import Any

KEY_PREFIX = "dit"
# How a model reads a request's condition (published per model in GET /v1/models):
CLASS_CONDITIONING = "class"  # prompts name labels of the checkpoint's id2label, or class_labels
TEXT_CONDITIONING = "text"  # free-text prompt and negative_prompt through a text encoder
# What RQ would call if a stock `rq worker` took one of our jobs: it explains itself and fails.
TASK_FUNCTION = "worker.rq_task.run"


class JobStatus(StrEnum):
    QUEUED = "queued"
    IN_PROGRESS = "in_progress"
    COMPLETED = "completed"
    FAILED = "failed"
    CANCELED = "canceled"


class JobKind(StrEnum):
    IMAGE = "image"
    VIDEO = "video"


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
    """Fields of the `dit:job:<id>` hash."""

    KIND = "kind"
    MODEL = "model"
    REQUEST = "request"  # JSON: the normalised request, including the effective seed
    COMPAT = "compat"  # jobs with equal compat keys can share one denoising loop
    SAMPLES = "samples"  # how many rows the job adds to a batch (n)
    CREATED_AT = "created_at"
    STARTED_AT = "started_at"
    COMPLETED_AT = "completed_at"
    PROGRESS = "progress"
    OUTPUTS = "outputs"  # JSON list of output descriptions
    ERROR = "error"  # JSON {"code", "message"}
    CANCEL = "cancel"  # "1" when a client asked to cancel a running job
    EXECUTION = "execution"  # id of the batch run that holds the job now
    WORKER = "worker"
    ATTEMPTS = "attempts"


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


def compat_key(model: str, kind: JobKind, width: int, height: int, steps: int, num_frames: int) -> str:
    """Jobs that may share one batched denoising loop: same model, size, steps and frames."""
    return f"{model}|{kind.value}|{width}x{height}|{steps}|{num_frames}"


@dataclass(frozen=True)
class JobError:
    code: str
    message: str

    def to_json(self) -> str:
        return json.dumps({"code": self.code, "message": self.message})


def loads_or(value: bytes | str | None, default: Any) -> Any:
    return json.loads(value) if value else default


# Error codes a worker fails a job with (a job's `error.code`).
SAMPLING_FAILED = "sampling_failed"
STORAGE_FAILED = "storage_failed"

# An RQ job that failed without our error record was failed by RQ's abandoned-job cleanup.
WORKER_LOST = JobError(
    "worker_lost",
    "The worker running this job stopped (crashed or was killed) and the job had no retries left.",
)
