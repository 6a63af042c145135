"""POST /v1/images and POST /v1/videos: validate, normalise, enqueue, answer 202 with the job."""

from fastapi import APIRouter, Depends, Request, Response, status
from redis import Redis

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


def _submit(
    request: Request,
    body: ImageRequest | VideoRequest,
    kind: JobKind,
    redis: Redis,
    settings: Settings,
    response: Response,
) -> JobBody:
    spec = choose_model(body.model, kind, served_models(redis), settings.default_model)
    job_id, record = new_job_id(), JobRecord.new(normalise(body, kind, spec))
    enqueue_job(redis, job_id, record, retries=settings.job_retries, ttl_s=settings.job_ttl_s)
    request.app.state.metrics.accepted.labels(kind.value, spec.name).inc()
    response.headers["Location"] = f"/v1/jobs/{job_id}"
    return job_body(redis, job_id)


@router.post("/images", status_code=status.HTTP_202_ACCEPTED, dependencies=[Depends(require_json)])
def create_image(
    request: Request, body: ImageRequest, redis: RedisDep, settings: SettingsDep, response: Response
) -> JobBody:
    """Queue an image generation job."""
    return _submit(request, body, JobKind.IMAGE, redis, settings, response)


@router.post("/videos", status_code=status.HTTP_202_ACCEPTED, dependencies=[Depends(require_json)])
def create_video(
    request: Request, body: VideoRequest, redis: RedisDep, settings: SettingsDep, response: Response
) -> JobBody:
    """Queue a video generation job."""
    return _submit(request, body, JobKind.VIDEO, redis, settings, response)
