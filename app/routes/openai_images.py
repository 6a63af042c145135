"""POST /v1/images/generations: OpenAI's images API on our image jobs.

The request becomes an image job through the same submission as POST /v1/images (key, rate,
normalisation, Idempotency-Key, queue), then the answer waits for the job (DIT_OPENAI_WAIT_S at most)
and carries the images, as base64 or as links to GET /v1/jobs/{id}/outputs/{k}. Errors come in
OpenAI's shape (app/openai_errors.py).
"""

import base64

from fastapi import APIRouter, Depends, Request, Response
from fastapi.concurrency import run_in_threadpool

from app.auth import Caller, CallerDep, get_caller
from app.deps import RedisDep, SettingsDep, StorageDep, require_json
from app.openai_errors import NO_RETRY, OpenAIError, OpenAIRoute
from app.openai_schemas import ImageData, ImagesResponse, OpenAIImageRequest
from app.openapi import OPENAI_IMAGES_RESPONSES, SUBMISSION_PARAMETERS
from app.routes.generation import submit
from app.views import output_url, read_record, wait_for_end
from dit_serve.contract import JobKind
from dit_serve.schemas import JobBody
from dit_serve.storage import Storage

router = APIRouter(prefix="/v1", tags=["openai"], route_class=OpenAIRoute)
CHECKS = [Depends(get_caller), Depends(require_json)]  # in this order: the key before anything else


@router.post(
    "/images/generations",
    dependencies=CHECKS,
    responses=OPENAI_IMAGES_RESPONSES,
    openapi_extra=SUBMISSION_PARAMETERS,
)
async def generate_images(
    request: Request,
    body: OpenAIImageRequest,
    redis: RedisDep,
    settings: SettingsDep,
    storage: StorageDep,
    response: Response,
    caller: CallerDep,
) -> ImagesResponse:
    """Generate images (OpenAI's `images.generate`): queue an image job, wait for it, answer its images."""
    if body.stream:
        return await stream_images(request, body, caller)
    job = await run_in_threadpool(
        submit, request, body.job_request(), JobKind.IMAGE, redis, settings, response, caller
    )
    job = await wait_for_end(request, redis, job.id, caller, settings.openai_wait_s)
    return await run_in_threadpool(
        _images, job, body.response_format, str(request.base_url), redis, storage, caller
    )


async def stream_images(request: Request, body: OpenAIImageRequest, caller: Caller) -> ImagesResponse:
    """`stream: true`: where OpenAI's streamed answer plugs in (SSE `image_generation.partial_image`
    events from the job's previews, then `image_generation.completed`, relayed from the job's event
    stream, dit_serve/events.py). Until it does, a 400 before anything is queued."""
    raise OpenAIError(
        400,
        "stream_unsupported",
        "stream: true is not supported yet; leave it out (or false) to get the images in one answer",
        param="stream",
    )


def _images(
    job: JobBody, response_format: str, base_url: str, redis: RedisDep, storage: Storage, caller: Caller
) -> ImagesResponse:
    """The answer for an ended job; an OpenAI-shaped error (never retried by the SDK, which would queue
    the job again) when it failed, was canceled or is still running."""
    if job.status == "completed":
        data = [ImageData(url=base_url.rstrip("/") + output.url) for output in job.outputs]
        if response_format == "b64_json":
            record, _ = read_record(redis, job.id, caller)
            data = [
                ImageData(b64_json=base64.b64encode(storage.get(out.key)).decode()) for out in record.outputs
            ]
        return ImagesResponse(
            created=int(job.created_at or 0),
            data=data,
            output_format=job.request.output_format.value,  # type: ignore[arg-type]  # an image format
            size=job.request.size,
            id=job.id,
            seed=job.request.seed,
        )
    if job.status == "failed" and job.error is not None:
        raise OpenAIError(500, job.error.code, f"job {job.id} failed: {job.error.message}", headers=NO_RETRY)
    if job.status == "canceled":
        raise OpenAIError(
            409, "job_canceled", f"job {job.id} was canceled before it completed", headers=NO_RETRY
        )
    raise OpenAIError(
        504,
        "generation_timeout",
        f"job {job.id} did not end in time (it is {job.status}, {job.progress}% done) and goes on: poll GET "
        f"/v1/jobs/{job.id} (?wait=60 answers when it ends) and download its images from "
        f"{output_url(job.id, 0)} and on",
        headers={**NO_RETRY, "Location": f"/v1/jobs/{job.id}"},
    )
