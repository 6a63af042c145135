"""OpenAI's videos API on our video jobs: POST /v1/videos (multipart/form-data), GET /v1/videos,
GET /v1/videos/{id}, DELETE /v1/videos/{id}, GET /v1/videos/{id}/content.

`POST /v1/videos` is two routes told apart by Content-Type: multipart/form-data (what the `openai`
SDK sends) is OpenAI's create-video here, answered with a video object; anything else goes on to our
job API (app/routes/generation.py, JSON). Every video job is listed here, whichever API created it;
image jobs are not videos (404). Errors come in OpenAI's shape (app/openai_errors.py).
"""

from typing import Annotated, Literal

from fastapi import APIRouter, Depends, FastAPI, Form, Query, Request, Response
from fastapi.concurrency import run_in_threadpool

from app.auth import Caller, CallerDep, get_caller
from app.deps import RedisDep, SettingsDep, StorageDep
from app.errors import NotFound
from app.openai_errors import NO_RETRY, OpenAIError, OpenAIMultipartRoute, OpenAIRoute
from app.openai_schemas import Video, VideoDeleted, VideoForm, VideoList
from app.openai_views import video_object, video_request
from app.openapi import (
    OPENAI_CONTENT_RESPONSES,
    OPENAI_DELETE_RESPONSES,
    OPENAI_LIST_RESPONSES,
    OPENAI_READ_RESPONSES,
    OPENAI_SUBMISSION_RESPONSES,
    SUBMISSION_PARAMETERS,
)
from app.routes.generation import submit
from app.routes.jobs import DEFAULT_PAGE, MAX_PAGE
from app.submission import choose_model
from app.thumbnails import THUMBNAIL_CONTENT_TYPE, thumbnail
from app.views import job_body, jobs_page, read_record, wait_for_end
from dit_serve.catalog import served_models
from dit_serve.contract import JobKind
from dit_serve.jobs import ENDED_STATUSES
from dit_serve.queueing import cancel_job
from dit_serve.retention import delete_job
from dit_serve.schemas import JobBody
from dit_serve.storage import OutputNotFoundError

router = APIRouter(
    prefix="/v1/videos", tags=["openai"], route_class=OpenAIRoute, dependencies=[Depends(get_caller)]
)
DELETE_WAIT_S = 30.0  # how long DELETE waits for a running video to stop at its next denoising step
VIDEO_CONTENT = {"video/mp4": {"schema": {"type": "string", "format": "binary"}}}
THUMBNAIL_CONTENT = {THUMBNAIL_CONTENT_TYPE: {"schema": {"type": "string", "format": "binary"}}}


def _video_job(redis: RedisDep, video_id: str, caller: Caller) -> JobBody:
    """The video job `video_id`; 404 for an image job, as for a missing one."""
    job = job_body(redis, video_id, caller)
    if job.kind != JobKind.VIDEO.value:
        raise NotFound(
            f"no video {video_id}: it is an image job (GET /v1/jobs/{video_id})", "video_not_found"
        )
    return job


def create_openai_video(
    request: Request,
    form: Annotated[VideoForm, Form(media_type="multipart/form-data")],
    redis: RedisDep,
    settings: SettingsDep,
    response: Response,
    caller: CallerDep,
) -> Video:
    """Create a video (OpenAI's `videos.create`, multipart/form-data): queue a video job, answer at once."""
    spec = choose_model(form.model, JobKind.VIDEO, served_models(redis), settings.default_model)
    job = submit(request, video_request(form, spec), JobKind.VIDEO, redis, settings, response, caller)
    return video_object(job, settings.job_ttl_s)


@router.get("", responses=OPENAI_LIST_RESPONSES)
def list_videos(
    redis: RedisDep,
    settings: SettingsDep,
    caller: CallerDep,
    after: Annotated[str | None, Query(description="`last_id` of the previous page")] = None,
    limit: Annotated[int, Query(ge=1, le=MAX_PAGE, description="videos per page")] = DEFAULT_PAGE,
    order: Annotated[Literal["asc", "desc"], Query(description="by creation time")] = "desc",
) -> VideoList:
    """The caller's video jobs (an admin's: all), newest first (`order=desc`) or oldest first."""
    jobs, has_more = jobs_page(
        redis, caller, after, limit, lambda job: job.kind == JobKind.VIDEO.value, oldest_first=order == "asc"
    )
    videos = [video_object(job, settings.job_ttl_s) for job in jobs]
    return VideoList(
        data=videos,
        first_id=videos[0].id if videos else None,
        last_id=videos[-1].id if videos else None,
        has_more=has_more,
    )


@router.get("/{video_id}", responses=OPENAI_READ_RESPONSES)
def retrieve_video(video_id: str, redis: RedisDep, settings: SettingsDep, caller: CallerDep) -> Video:
    """A video's status and progress (OpenAI's `videos.retrieve`)."""
    return video_object(_video_job(redis, video_id, caller), settings.job_ttl_s)


@router.delete("/{video_id}", responses=OPENAI_DELETE_RESPONSES)
async def delete_video(
    video_id: str,
    request: Request,
    redis: RedisDep,
    settings: SettingsDep,
    storage: StorageDep,
    caller: CallerDep,
) -> VideoDeleted:
    """Delete a video, its record and its MP4 (OpenAI's `videos.delete`); a queued or running one is
    canceled first (a running one stops at its next denoising step, waited for up to 30 s)."""
    job = await run_in_threadpool(_video_job, redis, video_id, caller)
    if job.status not in ENDED_STATUSES:
        outcome = await run_in_threadpool(cancel_job, redis, video_id, job.model, settings.job_ttl_s)
        request.app.state.metrics.cancels.labels(job.model, outcome).inc()
        job = await wait_for_end(request, redis, video_id, caller, DELETE_WAIT_S)
    deleted = job.status in ENDED_STATUSES and await run_in_threadpool(
        delete_job, redis, storage, video_id, settings.delete_outputs
    )
    if not deleted:
        raise OpenAIError(
            409,
            "video_running",
            f"video {video_id} was asked to stop but is still running; retry the DELETE in a few seconds",
        )
    return VideoDeleted(id=video_id, deleted=True)


@router.get(
    "/{video_id}/content",
    response_class=Response,
    responses={
        200: {
            "description": "the MP4, or its first frame as WebP",
            "content": VIDEO_CONTENT | THUMBNAIL_CONTENT,
        },
        **OPENAI_CONTENT_RESPONSES,
    },
)
def download_video(
    video_id: str,
    redis: RedisDep,
    storage: StorageDep,
    caller: CallerDep,
    variant: Annotated[
        Literal["video", "thumbnail"], Query(description="video: the MP4; thumbnail: its first frame (WebP)")
    ] = "video",
) -> Response:
    """A completed video's MP4, or its first frame (OpenAI's `videos.download_content`)."""
    job = _video_job(redis, video_id, caller)
    if job.status != "completed":
        raise OpenAIError(
            409,
            "video_not_ready",
            f"video {video_id} is {video_object(job, 0).status}, not completed: it has no content yet; "
            "wait until GET /v1/videos/{id} says completed",
            headers=NO_RETRY,  # the SDK would retry a 409 within seconds, long before most videos end
        )
    record, _ = read_record(redis, video_id, caller)
    output = record.outputs[0]
    try:
        data = storage.get(output.key)
    except OutputNotFoundError as exc:
        raise NotFound(f"the video {video_id} is gone from storage", "output_not_found") from exc
    if variant == "thumbnail":
        return Response(content=thumbnail(data, output.content_type), media_type=THUMBNAIL_CONTENT_TYPE)
    return Response(content=data, media_type=output.content_type)


def add_create_route(app: FastAPI) -> None:
    """Add `create_openai_video` to `app`, before our JSON `POST /v1/videos` is included.

    To the app itself, not through include_router: FastAPI matches an included route by its path and
    method alone, and this one also matches by Content-Type (OpenAIMultipartRoute.matches).
    """
    app.router.add_api_route(
        "/v1/videos",
        create_openai_video,
        methods=["POST"],
        route_class_override=OpenAIMultipartRoute,
        dependencies=[Depends(get_caller)],
        tags=["openai"],
        responses=OPENAI_SUBMISSION_RESPONSES,
        openapi_extra=SUBMISSION_PARAMETERS,
    )
