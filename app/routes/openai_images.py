"""POST /v1/images/generations: OpenAI's images API on our image jobs.

The request becomes an image job through the same submission as POST /v1/images (key, rate,
normalisation, Idempotency-Key, queue), then the answer waits for the job (DIT_OPENAI_WAIT_S at most)
and carries the images, as base64 or as links to GET /v1/jobs/{id}/outputs/{k}. Errors come in
OpenAI's shape (app/openai_errors.py).
"""

import base64
import json
import math
import time
from collections import Counter
from collections.abc import AsyncIterator

from fastapi import APIRouter, Depends, Request, Response
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import StreamingResponse
from redis import Redis

from app.auth import Caller, CallerDep, get_caller
from app.deps import RedisDep, SettingsDep, StorageDep, require_json
from app.job_stream import KEEP_ALIVE, StreamItem, job_stream, sse
from app.openai_errors import NO_RETRY, OpenAIError, OpenAIRoute, openai_error_body
from app.openai_schemas import (
    CompletedImageEvent,
    ImageData,
    ImagesResponse,
    OpenAIImageRequest,
    PartialImageEvent,
)
from app.openapi import OPENAI_IMAGES_RESPONSES, SUBMISSION_PARAMETERS
from app.routes.events import EVENT_STREAM
from app.routes.generation import submit
from app.submission import choose_model
from app.views import output_url, read_record, wait_for_end
from dit_serve.catalog import served_models
from dit_serve.config import Settings
from dit_serve.contract import JobKind
from dit_serve.events import EventType, PreviewEvent
from dit_serve.jobs import JobStatus
from dit_serve.schemas import JobBody
from dit_serve.storage import Storage

router = APIRouter(prefix="/v1", tags=["openai"], route_class=OpenAIRoute)
CHECKS = [Depends(get_caller), Depends(require_json)]  # in this order: the key before anything else


@router.post(
    "/images/generations",
    dependencies=CHECKS,
    responses=OPENAI_IMAGES_RESPONSES,
    openapi_extra=SUBMISSION_PARAMETERS,
    response_model=ImagesResponse,
)
async def generate_images(
    request: Request,
    body: OpenAIImageRequest,
    redis: RedisDep,
    settings: SettingsDep,
    storage: StorageDep,
    response: Response,
    caller: CallerDep,
) -> ImagesResponse | StreamingResponse:
    """Generate images (OpenAI's `images.generate`): queue an image job, wait for it, answer its images."""
    if body.stream:
        return await stream_images(request, body, redis, settings, storage, response, caller)
    job = await run_in_threadpool(
        submit, request, body.job_request(), JobKind.IMAGE, redis, settings, response, caller
    )
    job = await wait_for_end(request, redis, job.id, caller, settings.openai_wait_s)
    return await run_in_threadpool(
        _images, job, body.response_format, str(request.base_url), redis, storage, caller
    )


async def stream_images(
    request: Request,
    body: OpenAIImageRequest,
    redis: Redis,
    settings: Settings,
    storage: Storage,
    response: Response,
    caller: Caller,
) -> StreamingResponse:
    """`stream: true`: OpenAI's streamed answer, relayed from the job's events (app/job_stream.py).
    `partial_images` previews per image (the job's `previews` set so that that many fall due), as
    `image_generation.partial_image` events, then one `image_generation.completed` event per image;
    an `error` event if the job fails or is canceled."""
    job_request = body.job_request()
    partial = body.partial_images or 0
    if partial and job_request.previews is None:
        spec = choose_model(job_request.model, JobKind.IMAGE, served_models(redis), settings.default_model)
        steps = job_request.num_inference_steps or spec.defaults.num_inference_steps
        # Previews fall due at k, 2k, ... below `steps`: ceil(steps / (partial + 1)) gives at most
        # `partial` of them.
        job_request = job_request.model_copy(update={"previews": math.ceil(steps / (partial + 1))})
    job = await run_in_threadpool(
        submit, request, job_request, JobKind.IMAGE, redis, settings, response, caller
    )
    events = job_stream(request, redis, job.id, caller, job)
    return StreamingResponse(
        _openai_events(events, partial, redis, storage, caller),
        media_type=EVENT_STREAM,
        headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no", "Location": f"/v1/jobs/{job.id}"},
    )


async def _openai_events(
    events: AsyncIterator[StreamItem], partial: int, redis: Redis, storage: Storage, caller: Caller
) -> AsyncIterator[str]:
    sent: Counter[int] = Counter()  # partial images sent, by output index
    async for item in events:
        if item is None:
            yield KEEP_ALIVE
            continue
        kind, data, _ = item
        if kind == EventType.PREVIEW:
            preview = PreviewEvent.model_validate_json(data)
            if sent[preview.index] < partial:
                event = PartialImageEvent(
                    b64_json=preview.b64_json,
                    created_at=int(time.time()),
                    size=f"{preview.width}x{preview.height}",
                    partial_image_index=sent[preview.index],
                    index=preview.index,
                )
                sent[preview.index] += 1
                yield sse(event.type, event.model_dump_json())
        elif kind == JobStatus.COMPLETED:
            job = JobBody.model_validate_json(data)
            for completed in await run_in_threadpool(_completed_events, job, redis, storage, caller):
                yield sse(completed.type, completed.model_dump_json())
        elif kind in (JobStatus.FAILED, JobStatus.CANCELED):
            job = JobBody.model_validate_json(data)
            yield sse("error", _stream_error(job))


def _completed_events(
    job: JobBody, redis: Redis, storage: Storage, caller: Caller
) -> list[CompletedImageEvent]:
    record, _ = read_record(redis, job.id, caller)
    return [
        CompletedImageEvent(
            b64_json=base64.b64encode(storage.get(output.key)).decode(),
            created_at=int(job.completed_at or time.time()),
            size=job.request.size,
            output_format=job.request.output_format.value,  # type: ignore[arg-type]  # an image format
            index=output.index,
        )
        for output in record.outputs
    ]


def _stream_error(job: JobBody) -> str:
    """The `error` event's data for a job that failed or was canceled (the SDK raises APIError)."""
    if job.error is not None:
        body = openai_error_body(500, job.error.code, f"job {job.id} failed: {job.error.message}", None)
    else:
        body = openai_error_body(409, "job_canceled", f"job {job.id} was canceled before it completed", None)
    return json.dumps(body)


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
