"""Read jobs out of Redis and present them as the API's job objects."""

import time
from collections.abc import Callable

from fastapi import Request
from fastapi.concurrency import run_in_threadpool
from redis import Redis

from app.auth import Caller
from app.errors import Gone, InvalidRequest, NotFound, ServiceUnavailable
from dit_serve.contract import JobTooNewError
from dit_serve.eta import queued_eta_s, read_stats, running_eta_s
from dit_serve.job_index import UnknownCursorError, forget, index_key, newest_ids
from dit_serve.jobs import (
    ENDED_STATUSES,
    STATUS_FROM_RQ,
    WORKER_LOST,
    JobRecord,
    JobStatus,
    RecordField,
    ended_key,
    record_key,
    rq_job_key,
)
from dit_serve.queueing import queue_position
from dit_serve.retention import expired_key, parse_expired
from dit_serve.schemas import JobBody, OutputBody
from dit_serve.webhooks import job_deliveries

RQ_STATUS_FIELD = "status"
TIME_DECIMALS = 3
WAIT_SLICE_S = 1.0  # look at the job again at least this often while waiting (a reaped job signals nothing)
# Redis counts a blocking command's timeout in whole milliseconds, and 0 means forever: a wait with
# less left than this ends instead of blocking.
MIN_BLOCK_S = 0.001


def output_url(job_id: str, index: int) -> str:
    return f"/v1/jobs/{job_id}/outputs/{index}"


def read_record(redis: Redis, job_id: str, caller: Caller | None = None) -> tuple[JobRecord, JobStatus]:
    """The job's typed record and its status; NotFound when either is gone, or when `caller` (if given)
    may not see the job: the same answer as for a missing job, so ids cannot be probed. Gone when the
    retention sweep deleted the job within the grace period (dit_serve/retention.py) and `caller` may
    see it."""
    with redis.pipeline() as pipe:
        pipe.hgetall(record_key(job_id))
        pipe.hget(rq_job_key(job_id), RQ_STATUS_FIELD)
        pipe.hgetall(expired_key(job_id))
        raw, rq_status, marker = pipe.execute()
    missing = NotFound(f"no job {job_id}; jobs are kept for a limited time after they end", "job_not_found")
    if not raw or rq_status is None:
        expired = parse_expired(marker)
        if expired is not None and (caller is None or caller.sees(expired.owner)):
            raise Gone(
                f"job {job_id} has expired: its record and outputs were deleted after the retention "
                "period (DIT_JOB_TTL_S) that follows the end of a job",
                "job_expired",
            )
        raise missing
    if caller is not None and not caller.sees(_owner(raw)):
        raise missing
    try:
        record = JobRecord.from_hash(raw)
    except JobTooNewError as exc:  # a newer API replica wrote it, mid rolling upgrade
        raise ServiceUnavailable(f"job {job_id}: {exc}", "job_schema_too_new") from exc
    return record, STATUS_FROM_RQ.get(rq_status.decode(), JobStatus.QUEUED)


def _owner(raw: dict[bytes, bytes]) -> str | None:
    owner = raw.get(RecordField.OWNER.value.encode())
    return owner.decode() if owner is not None else None


def _time(value: float | None) -> float | None:
    return round(value, TIME_DECIMALS) if value else None


def job_body(redis: Redis, job_id: str, caller: Caller | None = None) -> JobBody:
    """The API's job object; NotFound when the job is gone or `caller` may not see it."""
    record, status = read_record(redis, job_id, caller)
    position = queue_position(redis, record.model, job_id) if status is JobStatus.QUEUED else None
    if status is JobStatus.QUEUED and position is None:
        # A worker took the job between the two reads: read it again, now that it has started.
        record, status = read_record(redis, job_id, caller)
    error = record.error
    if status is JobStatus.FAILED and error is None:
        error = WORKER_LOST
    queued = status is JobStatus.QUEUED
    steps = record.request.num_inference_steps
    if queued:
        eta_s = queued_eta_s(position or 0, steps, read_stats(redis, record.model))
    elif status is JobStatus.IN_PROGRESS:
        eta_s = running_eta_s(record.started_at, record.step, steps, time.time())
    else:
        eta_s = None
    return JobBody(
        id=job_id,
        kind=record.kind.value,
        model=record.model,
        status=status.value,
        progress=0 if queued else record.progress,
        queue_position=position if queued else None,
        eta_s=eta_s,
        created_at=_time(record.created_at),
        started_at=None if queued else _time(record.started_at),
        completed_at=_time(record.completed_at),
        request=record.request,
        outputs=[  # finished outputs only
            OutputBody(**output.model_dump(exclude={"key", "bytes"}), url=output_url(job_id, output.index))
            for output in record.outputs
        ]
        if status is JobStatus.COMPLETED
        else [],
        error=error if status is JobStatus.FAILED else None,
        deliveries=job_deliveries(redis, job_id) if record.request.webhook_url is not None else [],
    )


def stored_output(redis: Redis, job_id: str, index: int, caller: Caller) -> tuple[str, str]:
    """The storage key and content type of output `index` of a completed job."""
    record, _ = read_record(redis, job_id, caller)
    if not 0 <= index < len(record.outputs):
        raise NotFound(
            f"job {job_id} has {len(record.outputs)} outputs; no output {index}", "output_not_found"
        )
    output = record.outputs[index]
    return output.key, output.content_type


def jobs_page(
    redis: Redis,
    caller: Caller,
    after: str | None,
    limit: int,
    keep: Callable[[JobBody], bool],
    oldest_first: bool = False,
) -> tuple[list[JobBody], bool]:
    """Up to `limit` of the caller's jobs (an admin's: every job) that `keep` accepts, newest first
    (or oldest first), after job `after`; and whether there are more. 422 invalid_cursor for an
    `after` that is not in the listing."""
    key = index_key(caller.listed_owner)
    found: list[JobBody] = []
    expired: list[str] = []
    has_more = False
    try:
        for job_id in newest_ids(redis, key, after, oldest_first):
            try:
                body = job_body(redis, job_id, caller)
            except (NotFound, Gone):  # the sweep drops the entries of the jobs it deletes, but races it
                expired.append(job_id)
                continue
            if not keep(body):
                continue
            if len(found) == limit:
                has_more = True
                break
            found.append(body)
    except UnknownCursorError as exc:
        raise InvalidRequest(
            f"after: no job {after} in this listing (it may have expired)", "invalid_cursor"
        ) from exc
    for job_id in expired:  # after the scan: removing entries during it would shift its offsets
        forget(redis, key, job_id)
    return found, has_more


async def wait_for_end(request: Request, redis: Redis, job_id: str, caller: Caller, wait_s: float) -> JobBody:
    """The job object once the job has ended, or after `wait_s` seconds, whichever comes first.

    Workers and the API push to the job's `ended` list when it ends, so a waiting request wakes at
    once; BLMOVE from the list to itself leaves the entry for every other waiter. The wait holds no
    thread: it is a blocking command on the app's asyncio Redis client.
    """
    body = await run_in_threadpool(job_body, redis, job_id, caller)
    deadline = time.monotonic() + wait_s
    while body.status not in ENDED_STATUSES and (remaining := deadline - time.monotonic()) >= MIN_BLOCK_S:
        key = ended_key(job_id)
        await request.app.state.waits.blmove(key, key, min(remaining, WAIT_SLICE_S), "RIGHT", "LEFT")
        body = await run_in_threadpool(job_body, redis, job_id, caller)
    return body
