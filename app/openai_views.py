"""Our jobs as OpenAI's objects, and OpenAI's video fields as our job's.

`seconds` <-> frames: a video has the model's default number of frames (or `num_frames`), and
`seconds` sets how fast they play: fps = round(frames / seconds), between 1 and MAX_FPS, and the
clip's real length, frames / fps, must be within DURATION_TOLERANCE of `seconds`. When the default
frames cannot (12 s of the bundled model's 16 frames), fewer frames that the model takes can: the
count and fps closest to `seconds` (12 frames at 1 fps). A 400 otherwise, naming durations that
fit. Without `seconds`, the frames play at `fps` (default 8, as on our job API). The video object's
`seconds` is always the real length, frames / fps.
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


def _fps_for(seconds: float, frames: int) -> int | None:
    """The whole fps at which `frames` last about `seconds`, if one does."""
    fps = round(frames / seconds)
    if 1 <= fps <= MAX_FPS and abs(frames / fps - seconds) <= DURATION_TOLERANCE * seconds:
        return fps
    return None


def _fewer_frames(seconds: float, frames: int, spec: ModelSpec) -> tuple[int, int] | None:
    """When the model's default `frames` cannot last `seconds` at a whole fps: the frame count below it
    (one the model takes) and fps that come closest to `seconds`, within DURATION_TOLERANCE."""
    fits = [
        (abs(count / fps - seconds), -count, count, fps)
        for count in range(frames - 1, 0, -1)
        if (count - 1) % spec.frames_multiple == 0 and (fps := _fps_for(seconds, count)) is not None
    ]
    return min(fits)[2:] if fits else None


def _unsupported(seconds: float, frames: int, spec: ModelSpec) -> OpenAIError:
    exact = [duration(frames, rate) for rate in range(1, MAX_FPS + 1) if frames % rate == 0]
    return OpenAIError(
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
    num_frames = form.num_frames
    fps = form.fps or DEFAULT_FPS
    if form.seconds is not None:
        seconds = float(form.seconds)
        if seconds <= 0:
            raise OpenAIError(400, "invalid_request", "seconds must be more than 0", param="seconds")
        if form.fps is None:
            found = _fps_for(seconds, frames)
            if found is None and form.num_frames is None:
                # The default frames cannot last that long (or that short) at a whole fps: fewer can.
                num_frames, found = _fewer_frames(seconds, frames, spec) or (None, None)
            if found is None:
                raise _unsupported(seconds, frames, spec)
            fps = found
        elif abs(frames / fps - seconds) > DURATION_TOLERANCE * seconds:
            raise OpenAIError(
                400,
                "unsupported_seconds",
                f"{frames} frames at {fps} fps last {duration(frames, fps)} s, not {form.seconds}: leave "
                "out one of seconds and fps",
                param="seconds",
            )
    return VideoRequest(
        **form.model_dump(
            exclude={"seconds", "model", "num_frames", "fps", "loras", "lora_names", "lora_scales"},
            exclude_none=True,
        ),
        loras=form.lora_refs(),
        model=spec.name,
        num_frames=num_frames,
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
