"""GET /v1/jobs, GET /v1/jobs/{id}, GET /v1/jobs/{id}/outputs/{index}, DELETE /v1/jobs/{id}.

A caller sees only the jobs its API key created (admins: every job); anyone else's is a 404, the same
answer as for a missing job.
"""

from typing import Annotated, Literal

from fastapi import APIRouter, Query, Request, Response

from app.auth import CallerDep
from app.deps import RedisDep, SettingsDep, StorageDep
from app.errors import Conflict, NotFound
from app.openapi import (
    INVALID_CURSOR,
    INVALID_PARAMETER,
    JOB_EXPIRED,
    JOB_FINISHED,
    JOB_NOT_FOUND,
    JOB_SCHEMA_TOO_NEW,
    OUTPUT_NOT_FOUND,
    REDIS_UNAVAILABLE,
    UNAUTHORIZED,
    error_responses,
)
from app.views import job_body, jobs_page, read_record, stored_output, wait_for_end
from dit_serve.jobs import JobStatus
from dit_serve.queueing import cancel_job
from dit_serve.schemas import JobBody, JobList
from dit_serve.storage import OutputNotFoundError

router = APIRouter(prefix="/v1/jobs", tags=["jobs"])

DEFAULT_PAGE, MAX_PAGE = 20, 100
StatusName = Literal["queued", "in_progress", "completed", "failed", "canceled"]
READ_ERRORS = (UNAUTHORIZED, REDIS_UNAVAILABLE, JOB_SCHEMA_TOO_NEW)  # of every route that reads jobs
OUTPUT_CONTENT = {  # the content type the worker stored the output with (`outputs[].content_type`)
    media_type: {"schema": {"type": "string", "format": "binary"}} for media_type in ("image/*", "video/*")
}


@router.get("", responses=error_responses(*READ_ERRORS, INVALID_PARAMETER, INVALID_CURSOR))
def list_jobs(
    redis: RedisDep,
    caller: CallerDep,
    status: Annotated[StatusName | None, Query(description="only jobs in this status")] = None,
    limit: Annotated[int, Query(ge=1, le=MAX_PAGE, description="jobs per page")] = DEFAULT_PAGE,
    after: Annotated[str | None, Query(description="`last_id` of the previous page")] = None,
) -> JobList:
    """The caller's jobs (an admin's: every job), newest first, a page at a time."""
    found, has_more = jobs_page(
        redis, caller, after, limit, lambda body: status is None or body.status == JobStatus(status)
    )
    return JobList(data=found, has_more=has_more, last_id=found[-1].id if found else None)


MAX_WAIT_S = 60.0


@router.get(
    "/{job_id}", responses=error_responses(*READ_ERRORS, JOB_NOT_FOUND, JOB_EXPIRED, INVALID_PARAMETER)
)
async def get_job(
    job_id: str,
    request: Request,
    redis: RedisDep,
    caller: CallerDep,
    wait: Annotated[float, Query(ge=0, le=MAX_WAIT_S, description="seconds to wait for the job to end")] = 0,
) -> JobBody:
    """A job's status, progress and outputs; with `wait`, answered once it ends or `wait` s pass."""
    return await wait_for_end(request, redis, job_id, caller, wait)


@router.get(
    "/{job_id}/outputs/{index}",
    response_class=Response,
    responses={
        200: {"description": "the output's bytes", "content": OUTPUT_CONTENT},
        **error_responses(*READ_ERRORS, JOB_NOT_FOUND, JOB_EXPIRED, OUTPUT_NOT_FOUND, INVALID_PARAMETER),
    },
)
def get_output(job_id: str, index: int, redis: RedisDep, storage: StorageDep, caller: CallerDep) -> Response:
    """The bytes of one output, with its content type."""
    key, content_type = stored_output(redis, job_id, index, caller)
    try:
        data = storage.get(key)
    except OutputNotFoundError as exc:
        raise NotFound(f"output {index} of job {job_id} is gone from storage", "output_not_found") from exc
    return Response(content=data, media_type=content_type)


@router.delete(
    "/{job_id}",
    responses={
        202: {"model": JobBody, "description": "the job was running: it stops at its next denoising step"},
        **error_responses(*READ_ERRORS, JOB_NOT_FOUND, JOB_EXPIRED, JOB_FINISHED),
    },
)
def cancel(
    job_id: str,
    request: Request,
    redis: RedisDep,
    settings: SettingsDep,
    response: Response,
    caller: CallerDep,
) -> JobBody:
    """Cancel a job: a queued one at once (200), a running one at its next denoising step (202)."""
    record, _ = read_record(redis, job_id, caller)
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
