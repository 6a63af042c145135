"""A video's first frame as a still image: `GET /v1/videos/{id}/content?variant=thumbnail`.

Made on request from the stored video, not stored itself: decoding one frame is cheap next to
generating the video, and nothing extra is left in storage for the retention sweep to find.
"""

import io

import av
from PIL import Image

THUMBNAIL_FORMAT, THUMBNAIL_CONTENT_TYPE = "WEBP", "image/webp"  # what OpenAI's thumbnails are
THUMBNAIL_QUALITY = 90
ANIMATED_TYPES = frozenset(
    {"image/gif", "image/webp"}
)  # videos Pillow opens itself (output_format gif, webp)


class NoFrameError(ValueError):
    """The stored video holds no frame that can be decoded."""


def first_frame(video: bytes, content_type: str) -> Image.Image:
    """The first frame of an MP4 (PyAV), or of an animated GIF or WebP (Pillow), as RGB."""
    if content_type in ANIMATED_TYPES:
        with Image.open(io.BytesIO(video)) as image:
            return image.convert("RGB")  # an animation opens at its first frame
    with av.open(io.BytesIO(video), mode="r") as container:
        for frame in container.decode(video=0):
            return frame.to_image().convert("RGB")
    raise NoFrameError("the video has no frame")


def thumbnail(video: bytes, content_type: str) -> bytes:
    """The first frame of `video`, encoded as WebP."""
    buffer = io.BytesIO()
    first_frame(video, content_type).save(buffer, format=THUMBNAIL_FORMAT, quality=THUMBNAIL_QUALITY)
    return buffer.getvalue()
