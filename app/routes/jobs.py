"""GET /v1/jobs/{id}, GET /v1/jobs/{id}/outputs/{index}, DELETE /v1/jobs/{id}."""

from fastapi import APIRouter, Response

from app.deps import RedisDep, SettingsDep, StorageDep
from app.errors import Conflict, NotFound
from app.schemas import JobBody
from app.views import job_body, read_record, stored_output
from dit_serve.jobs import RecordField
from dit_serve.queueing import cancel_job
from dit_serve.storage import OutputNotFoundError

router = APIRouter(prefix="/v1/jobs", tags=["jobs"])


@router.get("/{job_id}")
def get_job(job_id: str, redis: RedisDep) -> JobBody:
    """A job's status, progress and outputs."""
    return job_body(redis, job_id)


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
def cancel(job_id: str, redis: RedisDep, settings: SettingsDep, response: Response) -> JobBody:
    """Cancel a job: a queued one at once (200), a running one at its next denoising step (202)."""
    record, _ = read_record(redis, job_id)
    outcome = cancel_job(redis, job_id, record[RecordField.MODEL.value].decode(), settings.job_ttl_s)
    if outcome == "missing":
        raise NotFound(f"no job {job_id}", "job_not_found")
    if outcome == "cancel_requested":
        response.status_code = 202
    elif outcome != "canceled":
        raise Conflict(f"job {job_id} has already ended ({job_body(redis, job_id).status})", "job_finished")
    return job_body(redis, job_id)
