"""POST /v1/images and POST /v1/videos: validate, normalise, enqueue, answer 202 with the job.

The caller's key is checked first (a request without a valid key learns nothing else), and its name
is stored as the job's owner.
"""

from fastapi import APIRouter, Depends, Request, Response, status
from redis import Redis

from app.auth import Caller, CallerDep, get_caller
from app.deps import RedisDep, SettingsDep, require_json
from app.schemas import ImageRequest, JobBody, VideoRequest
from app.submission import choose_model, new_job_id, normalise
from app.views import job_body
from dit_serve.catalog import served_models
from dit_serve.config import Settings
from dit_serve.contract import JobKind
from dit_serve.jobs import JobRecord
from dit_serve.queueing import enqueue_job

router = APIRouter(prefix="/v1", tags=["generation"])
CHECKS = [Depends(get_caller), Depends(require_json)]  # in this order: the key before anything else


def _submit(
    request: Request,
    body: ImageRequest | VideoRequest,
    kind: JobKind,
    redis: Redis,
    settings: Settings,
    response: Response,
    caller: Caller,
) -> JobBody:
    spec = choose_model(body.model, kind, served_models(redis), settings.default_model)
    job_id, record = new_job_id(), JobRecord.new(normalise(body, kind, spec), owner=caller.name)
    enqueue_job(redis, job_id, record, retries=settings.job_retries, ttl_s=settings.job_ttl_s)
    request.app.state.metrics.accepted.labels(kind.value, spec.name).inc()
    response.headers["Location"] = f"/v1/jobs/{job_id}"
    return job_body(redis, job_id)


@router.post("/images", status_code=status.HTTP_202_ACCEPTED, dependencies=CHECKS)
def create_image(
    request: Request,
    body: ImageRequest,
    redis: RedisDep,
    settings: SettingsDep,
    response: Response,
    caller: CallerDep,
) -> JobBody:
    """Queue an image generation job."""
    return _submit(request, body, JobKind.IMAGE, redis, settings, response, caller)


@router.post("/videos", status_code=status.HTTP_202_ACCEPTED, dependencies=CHECKS)
def create_video(
    request: Request,
    body: VideoRequest,
    redis: RedisDep,
    settings: SettingsDep,
    response: Response,
    caller: CallerDep,
) -> JobBody:
    """Queue a video generation job."""
    return _submit(request, body, JobKind.VIDEO, redis, settings, response, caller)
