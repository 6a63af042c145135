"""Read jobs out of Redis and present them as the API's job objects."""

from redis import Redis

from app.errors import NotFound
from app.schemas import JobBody, OutputBody
from dit_serve.jobs import (
    STATUS_FROM_RQ,
    WORKER_LOST,
    JobStatus,
    RecordField,
    loads_or,
    record_key,
    rq_job_key,
)
from dit_serve.queueing import queue_position

RQ_STATUS_FIELD = "status"


def _text(value: bytes | None) -> str | None:
    return value.decode() if value is not None else None


def _float(value: bytes | None) -> float | None:
    return round(float(value), 3) if value else None


def output_url(job_id: str, index: int) -> str:
    return f"/v1/jobs/{job_id}/outputs/{index}"


def read_record(redis: Redis, job_id: str) -> tuple[dict[str, bytes], str]:
    """The job's record and its RQ status; NotFound when either is gone."""
    with redis.pipeline() as pipe:
        pipe.hgetall(record_key(job_id))
        pipe.hget(rq_job_key(job_id), RQ_STATUS_FIELD)
        record, rq_status = pipe.execute()
    if not record or rq_status is None:
        raise NotFound(f"no job {job_id}; jobs are kept for a limited time after they end", "job_not_found")
    return {key.decode(): value for key, value in record.items()}, rq_status.decode()


def job_body(redis: Redis, job_id: str) -> JobBody:
    record, rq_status = read_record(redis, job_id)
    status = STATUS_FROM_RQ.get(rq_status, JobStatus.QUEUED)
    model = record[RecordField.MODEL.value].decode()
    position = queue_position(redis, model, job_id) if status is JobStatus.QUEUED else None
    if status is JobStatus.QUEUED and position is None:
        # A worker took the job between the two reads: read it again, now that it has started.
        record, rq_status = read_record(redis, job_id)
        status = STATUS_FROM_RQ.get(rq_status, JobStatus.QUEUED)
    error = loads_or(record.get(RecordField.ERROR.value), None)
    if status is JobStatus.FAILED and error is None:
        error = {"code": WORKER_LOST.code, "message": WORKER_LOST.message}
    outputs: list[OutputBody] = [
        OutputBody(**{**output, "url": output_url(job_id, output["index"])})
        for output in loads_or(record.get(RecordField.OUTPUTS.value), [])
    ]
    progress = int(record.get(RecordField.PROGRESS.value, b"0"))
    return JobBody(
        id=job_id,
        kind=record[RecordField.KIND.value].decode(),  # type: ignore[arg-type]
        model=model,
        status=status.value,
        progress=progress if status is not JobStatus.QUEUED else 0,
        queue_position=position if status is JobStatus.QUEUED else None,
        created_at=_float(record.get(RecordField.CREATED_AT.value)),
        started_at=_float(record.get(RecordField.STARTED_AT.value))
        if status is not JobStatus.QUEUED
        else None,
        completed_at=_float(record.get(RecordField.COMPLETED_AT.value)),
        request=loads_or(record.get(RecordField.REQUEST.value), {}),
        outputs=outputs if status is JobStatus.COMPLETED else [],  # finished outputs only
        error=error if status is JobStatus.FAILED else None,
    )


def stored_output(redis: Redis, job_id: str, index: int) -> tuple[str, str]:
    """The storage key and content type of output `index` of a completed job."""
    record, _ = read_record(redis, job_id)
    outputs = loads_or(record.get(RecordField.OUTPUTS.value), [])
    if not 0 <= index < len(outputs):
        raise NotFound(f"job {job_id} has {len(outputs)} outputs; no output {index}", "output_not_found")
    return outputs[index]["key"], outputs[index]["content_type"]
