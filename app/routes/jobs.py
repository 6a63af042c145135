"""GET /v1/jobs/{id}, GET /v1/jobs/{id}/outputs/{index}, DELETE /v1/jobs/{id}."""

import time
from typing import Annotated

from fastapi import APIRouter, Query, Request, Response
from fastapi.concurrency import run_in_threadpool

from app.deps import RedisDep, SettingsDep, StorageDep
from app.errors import Conflict, NotFound
from app.schemas import JobBody
from app.views import job_body, read_record, stored_output
from dit_serve.jobs import ENDED_STATUSES, ended_key
from dit_serve.queueing import cancel_job
from dit_serve.storage import OutputNotFoundError

router = APIRouter(prefix="/v1/jobs", tags=["jobs"])


MAX_WAIT_S = 60.0
WAIT_SLICE_S = 1.0  # look at the job again at least this often while waiting (a reaped job signals nothing)


@router.get("/{job_id}")
async def get_job(
    job_id: str,
    request: Request,
    redis: RedisDep,
    wait: Annotated[float, Query(ge=0, le=MAX_WAIT_S, description="seconds to wait for the job to end")] = 0,
) -> JobBody:
    """A job's status, progress and outputs; with `wait`, answered once it ends or `wait` s pass.

    Workers and the API push to the job's `ended` list when it ends, so a waiting request wakes at
    once; BLMOVE from the list to itself leaves the entry for every other waiter.
    """
    body = await run_in_threadpool(job_body, redis, job_id)
    deadline = time.monotonic() + wait
    while body.status not in ENDED_STATUSES and (remaining := deadline - time.monotonic()) > 0:
        key = ended_key(job_id)
        await request.app.state.waits.blmove(key, key, min(remaining, WAIT_SLICE_S), "RIGHT", "LEFT")
        body = await run_in_threadpool(job_body, redis, job_id)
    return body


@router.get("/{job_id}/outputs/{index}")
def get_output(job_id: str, index: int, redis: RedisDep, storage: StorageDep) -> Response:
    """The bytes of one output, with its content type."""
    key, content_type = stored_output(redis, job_id, index)
    try:
        data = storage.get(key)
    except OutputNotFoundError as exc:
        raise NotFound(f"output {index} of job {job_id} is gone from storage", "output_not_found") from exc
    return Response(content=data, media_type=content_type)


@router.delete("/{job_id}")
def cancel(
    job_id: str, request: Request, redis: RedisDep, settings: SettingsDep, response: Response
) -> JobBody:
    """Cancel a job: a queued one at once (200), a running one at its next denoising step (202)."""
    record, _ = read_record(redis, job_id)
    model = record.model
    outcome = cancel_job(redis, job_id, model, settings.job_ttl_s)
    if outcome == "missing":
        raise NotFound(f"no job {job_id}", "job_not_found")
    if outcome == "cancel_requested":
        response.status_code = 202
    elif outcome != "canceled":
        raise Conflict(f"job {job_id} has already ended ({job_body(redis, job_id).status})", "job_finished")
    request.app.state.metrics.cancels.labels(model, outcome).inc()
    return job_body(redis, job_id)
