"""Tests for worker.encoding: every output is decoded again with a real decoder (Pillow or PyAV)."""

from __future__ import annotations

import io

import av
import numpy as np
import pytest
from PIL import Image

from worker.encoding import (
    IMAGE_FORMATS,
    VIDEO_FORMATS,
    content_type_for,
    encode_image,
    encode_video,
    extension_for,
)

SOLID_RGB = (200, 60, 120)
LOSSY_MEAN_ABS_DIFF = 6.0  # allowed mean |decoded - original| for lossy codecs on smooth images
SOLID_MAX_ABS_DIFF = 6  # allowed per-channel error of a decoded solid colour


def _gradient(height: int, width: int) -> np.ndarray:
    """Return a smooth (H, W, 3) uint8 test image."""
    ys = np.linspace(0, 255, height)[:, None]  # (H, 1)
    xs = np.linspace(0, 255, width)[None, :]  # (1, W)
    red = np.broadcast_to(ys, (height, width))  # (H, W)
    green = np.broadcast_to(xs, (height, width))  # (H, W)
    blue = (red + green) / 2  # (H, W)
    return np.stack([red, green, blue], axis=-1).round().astype(np.uint8)  # (H, W, 3)


def _moving_frames(count: int, height: int, width: int) -> np.ndarray:
    """Return (F, H, W, 3) uint8 frames that all differ from each other."""
    base = _gradient(height, width).astype(np.int32)  # (H, W, 3)
    frames = [(base + 20 * index) % 256 for index in range(count)]  # F x (H, W, 3)
    return np.stack(frames).astype(np.uint8)  # (F, H, W, 3)


def _decode_mp4(data: bytes) -> tuple[str, list[np.ndarray]]:
    """Return the codec name and the decoded (H, W, 3) RGB frames of an mp4."""
    with av.open(io.BytesIO(data), mode="r") as container:
        codec = container.streams.video[0].codec_context.name
        frames = [frame.to_ndarray(format="rgb24") for frame in container.decode(video=0)]
    return codec, frames


def _mean_abs_diff(a: np.ndarray, b: np.ndarray) -> float:
    """Return the mean absolute difference of two uint8 arrays."""
    return float(np.abs(a.astype(np.int16) - b.astype(np.int16)).mean())


# --- images -----------------------------------------------------------------------------------------------


def test_png_round_trip_is_exact() -> None:
    pixels = np.random.default_rng(0).integers(0, 256, (31, 45, 3), dtype=np.uint8)  # (H, W, 3)
    data = encode_image(pixels, "png")
    with Image.open(io.BytesIO(data)) as image:
        assert image.format == "PNG"
        assert image.mode == "RGB"
        np.testing.assert_array_equal(np.asarray(image), pixels)


@pytest.mark.parametrize(("fmt", "pil_format"), [("jpeg", "JPEG"), ("webp", "WEBP")])
def test_lossy_images_decode_close(fmt: str, pil_format: str) -> None:
    pixels = _gradient(48, 64)  # (H, W, 3)
    data = encode_image(pixels, fmt)
    with Image.open(io.BytesIO(data)) as image:
        assert image.format == pil_format
        assert image.size == (64, 48)  # (W, H)
        decoded = np.asarray(image.convert("RGB"))  # (H, W, 3)
    assert _mean_abs_diff(decoded, pixels) < LOSSY_MEAN_ABS_DIFF


def test_non_contiguous_image_is_accepted() -> None:
    pixels = _gradient(20, 30)[:, ::-1]  # (H, W, 3), a negative-stride view
    with Image.open(io.BytesIO(encode_image(pixels, "png"))) as image:
        np.testing.assert_array_equal(np.asarray(image), pixels)


# --- videos -----------------------------------------------------------------------------------------------


def test_mp4_decodes_to_h264_frames() -> None:
    frames = _moving_frames(6, 32, 32)  # (F, H, W, 3)
    codec, decoded = _decode_mp4(encode_video(frames, 8, "mp4"))
    assert codec == "h264"
    assert len(decoded) == 6
    assert all(frame.shape == (32, 32, 3) for frame in decoded)


def test_mp4_solid_colour_is_close() -> None:
    frames = np.empty((4, 32, 48, 3), dtype=np.uint8)  # (F, H, W, 3)
    frames[:] = SOLID_RGB
    _, decoded = _decode_mp4(encode_video(frames, 24, "mp4"))
    assert len(decoded) == 4
    for frame in decoded:
        assert frame.shape == (32, 48, 3)
        error = np.abs(frame.astype(np.int16) - np.array(SOLID_RGB)).max()
        assert error <= SOLID_MAX_ABS_DIFF


def test_mp4_frame_rate_and_duration() -> None:
    with av.open(io.BytesIO(encode_video(_moving_frames(8, 32, 32), 4, "mp4")), mode="r") as container:
        stream = container.streams.video[0]
        assert stream.average_rate == 4
        assert stream.frames == 8
        assert container.duration is not None
        assert container.duration / av.time_base == pytest.approx(2.0, abs=0.01)


def test_mp4_odd_size_is_padded() -> None:
    frames = _moving_frames(3, 31, 33)  # (F, H=31, W=33, 3)
    _, decoded = _decode_mp4(encode_video(frames, 8, "mp4"))
    assert len(decoded) == 3
    assert decoded[0].shape == (32, 34, 3)  # padded by one row and one column
    assert _mean_abs_diff(decoded[0][:31, :33], frames[0]) < LOSSY_MEAN_ABS_DIFF


def test_mp4_single_frame() -> None:
    frames = np.full((1, 32, 32, 3), SOLID_RGB, dtype=np.uint8)  # (F=1, H, W, 3)
    codec, decoded = _decode_mp4(encode_video(frames, 8, "mp4"))
    assert codec == "h264"
    assert len(decoded) == 1
    assert np.abs(decoded[0].astype(np.int16) - np.array(SOLID_RGB)).max() <= SOLID_MAX_ABS_DIFF


@pytest.mark.parametrize(("fmt", "pil_format"), [("gif", "GIF"), ("webp", "WEBP")])
def test_animations_have_all_frames(fmt: str, pil_format: str) -> None:
    frames = _moving_frames(5, 24, 40)  # (F, H, W, 3)
    data = encode_video(frames, 10, fmt)
    with Image.open(io.BytesIO(data)) as image:
        assert image.format == pil_format
        assert getattr(image, "n_frames", 1) == 5
        assert image.size == (40, 24)  # (W, H)
        assert image.info.get("loop") == 0
        image.seek(2)
        decoded = np.asarray(image.convert("RGB"))  # (H, W, 3)
        assert image.info.get("duration") == 100  # per frame, ms (WebP reports it once a frame is loaded)
    assert _mean_abs_diff(decoded, frames[2]) < 2 * LOSSY_MEAN_ABS_DIFF


@pytest.mark.parametrize("fmt", ["gif", "webp"])
def test_single_frame_animation(fmt: str) -> None:
    frames = _moving_frames(1, 16, 16)  # (F=1, H, W, 3)
    with Image.open(io.BytesIO(encode_video(frames, 8, fmt))) as image:
        assert getattr(image, "n_frames", 1) == 1
        assert image.size == (16, 16)


# --- errors and tables ------------------------------------------------------------------------------------


def test_unknown_formats_raise() -> None:
    pixels = _gradient(8, 8)  # (H, W, 3)
    with pytest.raises(ValueError, match="unknown image format"):
        encode_image(pixels, "bmp")
    with pytest.raises(ValueError, match="unknown image format"):
        encode_image(pixels, "mp4")
    with pytest.raises(ValueError, match="unknown video format"):
        encode_video(pixels[None], 8, "avi")
    with pytest.raises(ValueError, match="unknown video format"):
        encode_video(pixels[None], 8, "png")
    with pytest.raises(ValueError, match="unknown output format"):
        extension_for("tiff")


@pytest.mark.parametrize(
    "pixels",
    [
        np.zeros((8, 8), dtype=np.uint8),  # (H, W): no channels
        np.zeros((8, 8, 4), dtype=np.uint8),  # RGBA
        np.zeros((8, 8, 3), dtype=np.float32),  # wrong dtype
        np.zeros((0, 8, 3), dtype=np.uint8),  # empty
        np.zeros((1, 8, 8, 3), dtype=np.uint8),  # a video, not an image
    ],
)
def test_bad_image_arrays_raise(pixels: np.ndarray) -> None:
    with pytest.raises(ValueError):
        encode_image(pixels, "png")


@pytest.mark.parametrize(
    "frames",
    [
        np.zeros((8, 8, 3), dtype=np.uint8),  # one image, not (F, H, W, 3)
        np.zeros((2, 8, 8, 1), dtype=np.uint8),  # one channel
        np.zeros((2, 8, 8, 3), dtype=np.float64),  # wrong dtype
        np.zeros((0, 8, 8, 3), dtype=np.uint8),  # no frames
    ],
)
@pytest.mark.parametrize("fmt", sorted(VIDEO_FORMATS))
def test_bad_video_arrays_raise(frames: np.ndarray, fmt: str) -> None:
    with pytest.raises(ValueError):
        encode_video(frames, 8, fmt)


@pytest.mark.parametrize("fps", [0, -5, 2.5, True])
def test_bad_fps_raises(fps: object) -> None:
    with pytest.raises(ValueError, match="fps"):
        encode_video(_moving_frames(2, 8, 8), fps, "mp4")  # type: ignore[arg-type]


def test_extensions_and_content_types() -> None:
    assert extension_for("jpeg") == "jpg"
    assert {fmt: extension_for(fmt) for fmt in ("png", "webp", "mp4", "gif")} == {
        "png": "png",
        "webp": "webp",
        "mp4": "mp4",
        "gif": "gif",
    }
    for table in (IMAGE_FORMATS, VIDEO_FORMATS):
        for fmt, content_type in table.items():
            assert content_type_for(fmt) == content_type
