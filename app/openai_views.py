"""Our jobs as OpenAI's objects, and OpenAI's video fields as our job's.

`seconds` <-> frames: a video has the model's default number of frames (or `num_frames`), and
`seconds` sets how fast they play: fps = round(frames / seconds), between 1 and MAX_FPS, and the
clip's real length, frames / fps, must be within DURATION_TOLERANCE of `seconds` (a 400 otherwise,
naming durations that fit). Without `seconds`, the frames play at `fps` (default 8, as on our job
API). The video object's `seconds` is always the real length, frames / fps.
"""

from app.openai_errors import OpenAIError
from app.openai_schemas import Video, VideoError, VideoForm
from dit_serve.contract import ModelSpec, OutputFormat
from dit_serve.schemas import DEFAULT_FPS, MAX_FPS, JobBody, VideoRequest

DURATION_TOLERANCE = 0.1  # the clip may be up to 10% longer or shorter than `seconds`
CANCELED = "canceled"
CANCELED_MESSAGE = "the video was canceled before it completed (DELETE /v1/jobs/{id}); create it again"


def duration(num_frames: int, fps: int) -> str:
    """A clip's length in seconds as OpenAI writes it: "4", "2.5"."""
    return f"{num_frames / fps:g}"


def _fps_for(seconds: float, frames: int, spec: ModelSpec) -> int:
    """The whole fps at which `frames` last about `seconds`; 400 when none does."""
    fps = round(frames / seconds)
    if 1 <= fps <= MAX_FPS and abs(frames / fps - seconds) <= DURATION_TOLERANCE * seconds:
        return fps
    exact = [duration(frames, rate) for rate in range(1, MAX_FPS + 1) if frames % rate == 0]
    raise OpenAIError(
        400,
        "unsupported_seconds",
        f"seconds {seconds:g} does not fit {spec.name}: its {frames} frames play at a whole fps from 1 to "
        f"{MAX_FPS}, so they last {duration(frames, MAX_FPS)} to {frames} s; exactly "
        f"{', '.join(exact)} s. Pick one of those, or send num_frames (the model takes up to "
        f"{spec.max_frames}) with seconds",
        param="seconds",
    )


def video_request(form: VideoForm, spec: ModelSpec) -> VideoRequest:
    """Our video job's request for OpenAI's create-video form, for model `spec`."""
    frames = form.num_frames or spec.defaults.num_frames or spec.max_frames or 1
    fps = form.fps or DEFAULT_FPS
    if form.seconds is not None:
        seconds = float(form.seconds)
        if seconds <= 0:
            raise OpenAIError(400, "invalid_request", "seconds must be more than 0", param="seconds")
        if form.fps is None:
            fps = _fps_for(seconds, frames, spec)
        elif abs(frames / fps - seconds) > DURATION_TOLERANCE * seconds:
            raise OpenAIError(
                400,
                "unsupported_seconds",
                f"{frames} frames at {fps} fps last {duration(frames, fps)} s, not {form.seconds}: leave "
                "out one of seconds and fps",
                param="seconds",
            )
    return VideoRequest(
        **form.model_dump(exclude={"seconds", "model", "num_frames", "fps"}, exclude_none=True),
        model=spec.name,
        num_frames=form.num_frames,
        fps=fps,
        output_format=OutputFormat.MP4.value,
    )


def video_object(job: JobBody, job_ttl_s: int) -> Video:
    """OpenAI's video object for a video job; a canceled job is `failed` with error code `canceled`."""
    request = job.request
    canceled = job.status == CANCELED
    error = VideoError(code=job.error.code, message=job.error.message) if job.error else None
    if canceled:
        error = VideoError(code=CANCELED, message=CANCELED_MESSAGE)
    return Video(
        id=job.id,
        model=job.model,
        status="failed" if canceled else job.status,  # type: ignore[arg-type]  # the rest are OpenAI's
        progress=job.progress,
        created_at=int(job.created_at or 0),
        completed_at=int(job.completed_at) if job.completed_at else None,
        expires_at=int(job.completed_at + job_ttl_s) if job.completed_at else None,
        prompt=request.prompt,
        size=request.size,
        seconds=duration(request.num_frames, request.fps or DEFAULT_FPS),
        error=error,
    )
