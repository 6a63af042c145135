"""Encode generated pixels (uint8 RGB arrays) into image and video files, in memory."""

from __future__ import annotations

import io
from fractions import Fraction

import av
import numpy as np
from PIL import Image

IMAGE_FORMATS = {"png": "image/png", "jpeg": "image/jpeg", "webp": "image/webp"}  # format -> content type
VIDEO_FORMATS = {"mp4": "video/mp4", "gif": "image/gif", "webp": "image/webp"}  # format -> content type
EXTENSIONS = {"png": "png", "jpeg": "jpg", "webp": "webp", "mp4": "mp4", "gif": "gif"}  # format -> extension

RGB_CHANNELS = 3
JPEG_QUALITY = 95
JPEG_SUBSAMPLING = 0  # 4:4:4 chroma: no colour bleeding on sharp generated edges
WEBP_QUALITY = 95  # WebP is lossy (quality 95) for both stills and animations: much smaller than lossless
WEBP_METHOD = 4  # libwebp effort 0 (fast) .. 6 (slow, smallest)
H264_CODEC = "libx264"
H264_PIX_FMT = "yuv420p"  # the pixel format every player decodes; needs even width and height
H264_CRF = 18  # visually lossless
H264_PRESET = "medium"
# RGB -> YUV with the BT.709 matrix (sRGB shares its primaries), limited range, and the stream tagged so
# players (and PyAV's own to_ndarray) convert back with the same matrix. FFmpeg AVCOL_* enum values:
H264_COLORSPACE = "itu709"  # swscale matrix used for the conversion
AVCOL_BT709 = 1  # AVCOL_SPC_BT709 / AVCOL_PRI_BT709 / AVCOL_TRC_BT709
AVCOL_RANGE_MPEG = 1  # limited ("TV") range, 16-235


def extension_for(fmt: str) -> str:
    """Return the file extension (no dot) for an image or video format; jpeg -> "jpg"."""
    try:
        return EXTENSIONS[fmt]
    except KeyError:
        raise ValueError(f"unknown output format {fmt!r}; expected one of {sorted(EXTENSIONS)}") from None


def content_type_for(fmt: str) -> str:
    """Return the MIME content type for an image or video format."""
    content_type = IMAGE_FORMATS.get(fmt) or VIDEO_FORMATS.get(fmt)
    if content_type is None:
        raise ValueError(f"unknown output format {fmt!r}; expected one of {sorted(EXTENSIONS)}")
    return content_type


def _check_pixels(array: np.ndarray, ndim: int, layout: str, name: str) -> None:
    """Raise ValueError unless array is a non-empty uint8 RGB array with ndim dimensions."""
    if not isinstance(array, np.ndarray):
        raise ValueError(f"{name} must be a numpy array {layout} uint8, got {type(array).__name__}")
    if array.dtype != np.uint8:
        raise ValueError(f"{name} must have dtype uint8, got {array.dtype}")
    if array.ndim != ndim or array.shape[-1] != RGB_CHANNELS:
        raise ValueError(f"{name} must have shape {layout} with 3 RGB channels, got {array.shape}")
    if 0 in array.shape:
        raise ValueError(f"{name} must not be empty, got shape {array.shape}")


def encode_image(pixels: np.ndarray, fmt: str) -> bytes:
    """Encode one (H, W, 3) uint8 RGB image as png (lossless), jpeg (quality 95) or webp (quality 95)."""
    if fmt not in IMAGE_FORMATS:
        raise ValueError(f"unknown image format {fmt!r}; expected one of {sorted(IMAGE_FORMATS)}")
    _check_pixels(pixels, 3, "(H, W, 3)", "pixels")
    image = Image.fromarray(np.ascontiguousarray(pixels))  # (H, W, 3) -> RGB image
    buffer = io.BytesIO()
    if fmt == "png":
        image.save(buffer, format="PNG")
    elif fmt == "jpeg":
        image.save(buffer, format="JPEG", quality=JPEG_QUALITY, subsampling=JPEG_SUBSAMPLING)
    else:
        image.save(buffer, format="WEBP", quality=WEBP_QUALITY, method=WEBP_METHOD)
    return buffer.getvalue()


def encode_video(frames: np.ndarray, fps: int, fmt: str) -> bytes:
    """Encode (F, H, W, 3) uint8 RGB frames as mp4 (H.264), or an animated gif or webp looping forever."""
    if fmt not in VIDEO_FORMATS:
        raise ValueError(f"unknown video format {fmt!r}; expected one of {sorted(VIDEO_FORMATS)}")
    _check_pixels(frames, 4, "(F, H, W, 3)", "frames")
    if isinstance(fps, bool) or not isinstance(fps, (int, np.integer)) or fps <= 0:
        raise ValueError(f"fps must be a positive integer, got {fps!r}")
    if fmt == "mp4":
        return _encode_mp4(frames, int(fps))
    return _encode_animation(frames, int(fps), fmt)


def _encode_mp4(frames: np.ndarray, fps: int) -> bytes:
    """Encode frames as H.264 yuv420p in an mp4 container, in memory, through PyAV."""
    _, height, width, _ = frames.shape
    # yuv420p subsamples chroma 2x2, so H.264 needs even sizes: pad an odd height or width by one
    # row/column replicating the edge (the decoded video is then at most one pixel larger).
    pad_h, pad_w = height % 2, width % 2
    if pad_h or pad_w:
        frames = np.pad(frames, ((0, 0), (0, pad_h), (0, pad_w), (0, 0)), mode="edge")  # (F, H', W', 3)
    buffer = io.BytesIO()
    with av.open(buffer, mode="w", format="mp4") as container:
        stream = container.add_stream(H264_CODEC, rate=fps)
        assert isinstance(stream, av.VideoStream)  # narrows the type for mypy
        stream.width = width + pad_w
        stream.height = height + pad_h
        stream.pix_fmt = H264_PIX_FMT
        codec = stream.codec_context
        codec.time_base = Fraction(1, fps)
        codec.colorspace = AVCOL_BT709
        codec.color_primaries = AVCOL_BT709
        codec.color_trc = AVCOL_BT709
        codec.color_range = AVCOL_RANGE_MPEG
        stream.options = {"crf": str(H264_CRF), "preset": H264_PRESET}
        for index, rgb in enumerate(frames):  # rgb: (H', W', 3)
            frame = av.VideoFrame.from_ndarray(np.ascontiguousarray(rgb), format="rgb24")
            frame = frame.reformat(format=H264_PIX_FMT, dst_colorspace=H264_COLORSPACE)
            frame.pts = index
            frame.time_base = Fraction(1, fps)
            container.mux(stream.encode(frame))
        container.mux(stream.encode(None))  # flush the encoder's delayed frames
    return buffer.getvalue()


def _encode_animation(frames: np.ndarray, fps: int, fmt: str) -> bytes:
    """Encode frames as an animated GIF or WebP with Pillow, looping forever."""
    images = [Image.fromarray(np.ascontiguousarray(rgb)) for rgb in frames]  # rgb: (H, W, 3)
    duration_ms = round(1000 / fps)  # GIF stores centiseconds, so GIF timing is rounded to 10 ms
    buffer = io.BytesIO()
    options: dict[str, object] = {
        "save_all": True,
        "append_images": images[1:],
        "duration": duration_ms,
        "loop": 0,
    }
    if fmt == "gif":
        # Pillow quantises each frame to its own adaptive 256-colour palette. It also merges a frame
        # identical to the previous one into it (adding the durations), so the file may hold fewer
        # than F frames while the total duration is unchanged.
        images[0].save(buffer, format="GIF", **options)
    else:
        images[0].save(buffer, format="WEBP", quality=WEBP_QUALITY, method=WEBP_METHOD, **options)
    return buffer.getvalue()
