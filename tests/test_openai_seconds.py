"""OpenAI's `seconds` for a video, as our frames and fps (app/openai_views.py), in-process."""

import pytest

from app.openai_errors import OpenAIError
from app.openai_schemas import VideoForm
from app.openai_views import video_request
from dit_serve.contract import ConditioningKind, JobKind, ModelDefaults, ModelSpec

SHAPES = ModelSpec(
    name="dit-shapes-video",
    kind=JobKind.VIDEO,
    family="dit-video",
    conditioning=ConditioningKind.CLASS,
    sizes=["32x32"],
    default_size="32x32",
    defaults=ModelDefaults(num_inference_steps=25, guidance_scale=4.0, num_frames=16),
    max_frames=16,
)
WAN = SHAPES.model_copy(
    update={
        "name": "wan",
        "defaults": ModelDefaults(num_inference_steps=50, guidance_scale=5.0, num_frames=81),
        "max_frames": 81,
        "frames_multiple": 4,
    }
)


@pytest.mark.parametrize(
    ("spec", "seconds", "frames", "fps"),
    [
        (SHAPES, "4", None, 4),  # the default 16 frames
        (SHAPES, "8", None, 2),
        (SHAPES, "12", 12, 1),  # 16 frames cannot last 12 s at a whole fps: 12 frames at 1 fps can
        (SHAPES, "2.5", None, 6),  # 16 / 6 = 2.67 s, within 10%
        (WAN, "4", None, 20),  # 81 frames, 4.05 s
        (WAN, "12", None, 7),
    ],
)
def test_seconds_become_frames_and_fps(spec: ModelSpec, seconds: str, frames: int | None, fps: int) -> None:
    request = video_request(VideoForm(prompt="red circle moving up", seconds=seconds), spec)
    assert (request.num_frames, request.fps) == (frames, fps)
    length = (request.num_frames or spec.defaults.num_frames or 0) / fps
    assert abs(length - float(seconds)) <= 0.1 * float(seconds)


def test_seconds_no_frame_count_can_last_are_refused_with_the_ones_that_fit() -> None:
    with pytest.raises(OpenAIError) as refused:
        video_request(VideoForm(prompt="red circle moving up", seconds="30"), SHAPES)
    assert refused.value.code == "unsupported_seconds" and refused.value.param == "seconds"
    assert "16, 8, 4, 2, 1 s" in str(refused.value)
    # With num_frames given, fewer frames are not tried: the client chose them.
    with pytest.raises(OpenAIError):
        video_request(VideoForm(prompt="red circle moving up", seconds="12", num_frames=16), SHAPES)
