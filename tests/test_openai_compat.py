"""The OpenAI-compatible routes driven by the unmodified `openai` SDK against a real API and worker.

One service (API + worker, the tiny image and video models) serves the module; a second, with auth
on, checks that the SDK's key goes through and that a bad one raises AuthenticationError.
"""

import base64
import io
import json
import time
from collections.abc import Iterator
from pathlib import Path

import av
import httpx
import numpy as np
import openai
import pytest
from openai import OpenAI
from PIL import Image
from redis import Redis

from dit_serve.keys import create_key
from tests.conftest import Service, running_service

# The SDK marks its video API (Sora) deprecated; the calls still work, and are what is tested here.
pytestmark = [pytest.mark.slow, pytest.mark.filterwarnings("ignore:The Sora API:DeprecationWarning")]

STEPS = 2  # denoising steps: enough to check the plumbing, fast on CPU
POLL_TIMEOUT_S = 60.0
THUMBNAIL_TOLERANCE = 12.0  # mean absolute difference (0-255) of a WebP thumbnail from its H.264 frame


@pytest.fixture(scope="module")
def client(service: Service) -> OpenAI:
    return OpenAI(base_url=f"{service.base_url}/v1", api_key="unused-with-auth-off", max_retries=0)


def test_images_generate_answers_b64_json_pngs_of_the_asked_size(client: OpenAI) -> None:
    answer = client.images.generate(
        model="img", prompt="red circle", n=2, size="32x32", response_format="b64_json",
        extra_body={"seed": 5, "num_inference_steps": STEPS, "quality": "high", "user": "someone"},
    )  # fmt: skip
    assert answer.size == "32x32" and answer.output_format == "png" and answer.data is not None
    assert len(answer.data) == 2 and abs(answer.created - time.time()) < POLL_TIMEOUT_S
    pixels = []
    for image in answer.data:
        assert image.b64_json is not None and image.url is None
        png = Image.open(io.BytesIO(base64.b64decode(image.b64_json)))
        assert png.format == "PNG" and png.size == (32, 32)
        pixels.append(png.convert("RGB").tobytes())
    assert pixels[0] != pixels[1]  # seeds 5 and 6: two different images


def test_images_generate_with_url_links_to_the_job_outputs(client: OpenAI, service: Service) -> None:
    answer = client.images.generate(
        prompt="blue square", response_format="url", output_format="jpeg",
        extra_body={"num_inference_steps": STEPS},
    )  # fmt: skip
    assert answer.data is not None and len(answer.data) == 1 and answer.output_format == "jpeg"
    url = answer.data[0].url
    assert url is not None and url.startswith(f"{service.base_url}/v1/jobs/") and url.endswith("/outputs/0")
    downloaded = httpx.get(url, timeout=30)
    assert downloaded.status_code == 200 and downloaded.headers["content-type"] == "image/jpeg"
    assert Image.open(io.BytesIO(downloaded.content)).size == (32, 32)


def test_bad_image_requests_raise_bad_request_with_the_param(client: OpenAI) -> None:
    with pytest.raises(openai.BadRequestError) as too_many:
        client.images.generate(prompt="red circle", n=9)
    assert too_many.value.status_code == 400 and too_many.value.param == "n"
    assert too_many.value.type == "invalid_request_error"
    with pytest.raises(openai.BadRequestError) as size:
        client.images.generate(prompt="red circle", size="1024x1024")
    assert size.value.code == "unsupported_size" and size.value.param == "size"
    assert "32x32" in str(size.value.message)
    with pytest.raises(openai.BadRequestError) as label:
        client.images.generate(prompt="purple elephant")
    assert label.value.code == "unknown_label" and label.value.param == "prompt"


def test_a_streamed_generation_sends_partial_images_then_each_image(client: OpenAI) -> None:
    """stream=True with partial_images: the SDK iterates previews taken during denoising, then the
    images; 6 steps and 2 partial images make previews due at steps 2 and 4."""
    stream = client.images.generate(
        prompt="red circle", n=2, stream=True, partial_images=2, extra_body={"num_inference_steps": 6}
    )
    events = list(stream)
    partial = [event for event in events if event.type == "image_generation.partial_image"]
    completed = [event for event in events if event.type == "image_generation.completed"]
    assert len(events) == len(partial) + len(completed) and events[-1].type == "image_generation.completed"
    assert sorted((event.index, event.partial_image_index) for event in partial) == [
        (0, 0),
        (0, 1),
        (1, 0),
        (1, 1),
    ]
    assert sorted(event.index for event in completed) == [0, 1]
    for event in [*partial, *completed]:
        image = Image.open(io.BytesIO(base64.b64decode(event.b64_json)))
        assert image.format == "PNG" and image.size == (32, 32) and event.size == "32x32"
    assert all(event.usage.total_tokens == 0 for event in completed)


def _wait_completed(client: OpenAI, video_id: str) -> openai.types.Video:
    deadline = time.monotonic() + POLL_TIMEOUT_S
    while (video := client.videos.retrieve(video_id)).status in ("queued", "in_progress"):
        assert time.monotonic() < deadline, video
        time.sleep(0.2)
    return video


def test_videos_create_retrieve_list_download_and_delete(client: OpenAI, service: Service) -> None:
    created = client.videos.create(
        model="vid", prompt="red circle moving up", seconds="4", extra_body={"num_inference_steps": STEPS}
    )
    assert created.object == "video" and created.model == "vid" and created.size == "32x32"
    assert created.status in ("queued", "in_progress") and created.seconds == "4"
    assert created.prompt == "red circle moving up" and created.error is None
    done = _wait_completed(client, created.id)
    assert done.status == "completed" and done.progress == 100 and done.completed_at is not None
    assert done.expires_at is not None and done.expires_at > done.completed_at

    mp4 = client.videos.download_content(created.id).read()
    with av.open(io.BytesIO(mp4)) as container:
        stream = container.streams.video[0]
        frames = [frame.to_ndarray(format="rgb24") for frame in container.decode(stream)]
        assert stream.average_rate == 4  # the model's 16 frames over 4 seconds
    assert len(frames) == 16 and frames[0].shape == (32, 32, 3)
    thumbnail = Image.open(io.BytesIO(client.videos.download_content(created.id, variant="thumbnail").read()))
    assert thumbnail.format == "WEBP" and thumbnail.size == (32, 32)
    thumb = np.asarray(thumbnail.convert("RGB"), dtype=float)
    assert np.abs(thumb - frames[0]).mean() < THUMBNAIL_TOLERANCE  # the first frame, not another
    assert np.abs(thumb - frames[-1]).mean() > np.abs(thumb - frames[0]).mean()

    listed = client.videos.list(limit=10)
    assert created.id in [video.id for video in listed.data] and listed.data[0].object == "video"
    newest_first = [video.id for video in client.videos.list(limit=100).data]
    assert [video.id for video in client.videos.list(order="asc", limit=100).data] == newest_first[::-1]

    deleted = client.videos.delete(created.id)
    assert deleted.id == created.id and deleted.deleted and deleted.object == "video.deleted"
    with pytest.raises(openai.NotFoundError):
        client.videos.retrieve(created.id)
    assert httpx.get(f"{service.base_url}/v1/jobs/{created.id}").status_code == 404  # the job is gone too
    assert created.id not in [video.id for video in client.videos.list(limit=100).data]


def test_a_video_list_pages_with_after(client: OpenAI) -> None:
    ids = [
        client.videos.create(prompt="blue square moving left", extra_body={"num_inference_steps": STEPS}).id
        for _ in range(3)
    ]
    first = client.videos.list(limit=2)
    assert [video.id for video in first.data] == ids[::-1][:2] and first.has_more
    second = client.videos.list(limit=2, after=first.last_id)
    assert second.data[0].id == ids[0]
    for video_id in ids:
        _wait_completed(client, video_id)
        client.videos.delete(video_id)


def test_deleting_a_queued_video_cancels_it_first(client: OpenAI, service: Service) -> None:
    slow = client.videos.create(prompt="red circle moving up", extra_body={"num_inference_steps": 100})
    queued = client.videos.create(prompt="red circle moving up", extra_body={"num_inference_steps": STEPS})
    assert client.videos.delete(queued.id).deleted
    assert client.videos.delete(slow.id).deleted  # running or queued: canceled, then deleted
    for video_id in (slow.id, queued.id):
        with pytest.raises(openai.NotFoundError):
            client.videos.retrieve(video_id)


def test_video_errors_raise_the_sdks_typed_exceptions(client: OpenAI, service: Service) -> None:
    with pytest.raises(openai.BadRequestError) as seconds:
        client.videos.create(prompt="red circle moving up", seconds="30")  # 16 frames last 16 s at most
    assert seconds.value.code == "unsupported_seconds" and seconds.value.param == "seconds"
    assert "16 frames" in str(seconds.value.message) and "num_frames" in str(seconds.value.message)
    with pytest.raises(openai.BadRequestError) as size:
        client.videos.create(prompt="red circle moving up", size="1280x720")
    assert size.value.code == "unsupported_size"
    with pytest.raises(openai.BadRequestError) as model:
        client.videos.create(prompt="red circle moving up", model="img")
    assert model.value.code == "wrong_kind" and model.value.param == "model"
    with pytest.raises(openai.NotFoundError) as missing:
        client.videos.retrieve("no-such-video")
    assert missing.value.code == "job_not_found"
    image = httpx.post(f"{service.base_url}/v1/images", json={"prompt": "red circle"}).json()
    with pytest.raises(openai.NotFoundError):
        client.videos.retrieve(image["id"])  # an image job is no video
    with pytest.raises(openai.BadRequestError) as variant:
        client.videos.download_content(image["id"], variant="spritesheet")
    assert variant.value.param == "variant"


def test_json_post_videos_is_still_our_job_api(service: Service) -> None:
    answer = httpx.post(
        f"{service.base_url}/v1/videos",
        json={"prompt": "green square moving up", "num_inference_steps": STEPS, "fps": 4},
        timeout=30,
    )
    assert answer.status_code == 202 and answer.headers["location"].startswith("/v1/jobs/")
    job = answer.json()
    assert job["object"] == "job" and job["kind"] == "video" and job["request"]["fps"] == 4
    refused = httpx.post(f"{service.base_url}/v1/videos", json={"prompt": "x", "n": 2}, timeout=30)
    assert refused.status_code == 422 and set(refused.json()["error"]) == {"code", "message"}
    form = httpx.post(f"{service.base_url}/v1/videos", data={"prompt": "x"}, timeout=30)
    assert form.status_code == 415  # a url-encoded form is neither OpenAI's (multipart) nor ours (JSON)


@pytest.fixture(scope="module")
def auth_url(
    redis_url: str, model_dirs: dict[str, Path], tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[str, dict[str, str]]]:
    with running_service(
        redis_url, tmp_path_factory.mktemp("openai-auth"), {"vid": model_dirs["vid"]}, {"DIT_AUTH": "on"}
    ) as svc:
        redis = Redis.from_url(svc.redis_url)
        keys = {name: create_key(redis, name)[1] for name in ("alice", "bob")}
        yield svc.base_url, keys


def test_api_keys_and_isolation_on_the_openai_routes(auth_url: tuple[str, dict[str, str]]) -> None:
    url, keys = auth_url
    alice, bob = (
        OpenAI(base_url=f"{url}/v1", api_key=keys[name], max_retries=0) for name in ("alice", "bob")
    )
    with pytest.raises(openai.AuthenticationError) as refused:
        OpenAI(base_url=f"{url}/v1", api_key="sk-wrong", max_retries=0).videos.list()
    assert refused.value.code == "unauthorized" and refused.value.type == "authentication_error"
    video = alice.videos.create(prompt="red circle moving up", extra_body={"num_inference_steps": STEPS})
    assert [v.id for v in alice.videos.list().data] == [video.id]
    assert bob.videos.list().data == []
    with pytest.raises(openai.NotFoundError):
        bob.videos.retrieve(video.id)
    with pytest.raises(openai.NotFoundError):
        bob.videos.delete(video.id)
    assert alice.videos.delete(video.id).deleted
    body = json.loads(refused.value.response.text)
    assert set(body["error"]) == {"message", "type", "param", "code"}
