"""Text-conditioned families (PixArt, Wan) served end to end: real HTTP, Redis and a worker process.

The worker serves a tiny PixArt-Σ, a tiny Wan 2.1 and the tiny class-conditional DiT; requests in the
documented shape come back as the family's own diffusers pipeline would have made them, batched.
"""

import io
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import av
import numpy as np
import pytest
import torch
from diffusers import PixArtSigmaPipeline
from PIL import Image
from redis import Redis

from tests.conftest import Service, running_service, wait_for_status
from tests.test_api_validation import _queued_state

MAX_PIXEL_DIFF = 2  # out of 255: the worker's batched fp32 CPU sampling vs one pipeline call
STEPS = 6
PROMPTS = [
    ("A red fox under the sky", ""),
    ("a blue car in the city at night", "blurry"),
    ("a small bird", "ugly drawing"),
    ("a house by the river", ""),
]


@pytest.fixture(scope="module")
def text_service(
    redis_url: str, model_dirs: dict[str, Path], tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Service]:
    models = {"pixart": model_dirs["pixart-sigma"], "wan": model_dirs["wan"], "img": model_dirs["img"]}
    tmp = tmp_path_factory.mktemp("text-service")
    # A 500 ms batch-filling wait: long enough for four concurrent posts to share a batch.
    with running_service(redis_url, tmp, models, DIT_MAX_WAIT_MS="500") as svc:
        yield svc


def test_models_endpoint_describes_text_families(text_service: Service) -> None:
    with text_service.client() as client:
        models = {model["name"]: model for model in client.get("/v1/models").json()["data"]}
    pixart, wan, img = models["pixart"], models["wan"], models["img"]
    assert (pixart["family"], pixart["kind"], pixart["conditioning"], pixart["labels"]) == (
        "pixart",
        "image",
        "text",
        None,
    )
    assert pixart["defaults"] == {"num_inference_steps": 20, "guidance_scale": 4.5, "num_frames": None}
    assert (wan["family"], wan["kind"], wan["default_size"], wan["size_multiple"]) == (
        "wan",
        "video",
        "832x480",
        16,
    )
    assert (wan["max_frames"], wan["frames_multiple"], wan["max_pixels"]) == (81, 4, 1280 * 720)
    assert img["conditioning"] == "class"


def test_four_prompts_batch_and_each_equals_the_pipeline(
    text_service: Service, model_dirs: dict[str, Path]
) -> None:
    def submit(k: int) -> str:
        prompt, negative = PROMPTS[k]
        body = {"model": "pixart", "prompt": prompt, "negative_prompt": negative, "seed": 40 + k}
        body |= {"num_inference_steps": STEPS, "guidance_scale": 3.0 + k}
        with text_service.client() as client:
            response = client.post("/v1/images", json=body)
        assert response.status_code == 202, response.text
        return response.json()["id"]

    with ThreadPoolExecutor(len(PROMPTS)) as pool:
        ids = list(pool.map(submit, range(len(PROMPTS))))
    with text_service.client() as client:
        jobs = [wait_for_status(client, job_id, {"completed", "failed"}) for job_id in ids]
        assert all(job["status"] == "completed" for job in jobs), jobs
        request = jobs[1]["request"]
        assert request["negative_prompt"] == "blurry" and request["class_labels"] is None
        images = [
            np.asarray(Image.open(io.BytesIO(client.get(job["outputs"][0]["url"]).content)).convert("RGB"))
            for job in jobs
        ]
    executions = {
        Redis.from_url(text_service.redis_url).hget(f"dit:job:{job_id}", "execution") for job_id in ids
    }
    assert len(executions) < len(ids), "four prompts posted at once should share a batch"
    pipe = PixArtSigmaPipeline.from_pretrained(model_dirs["pixart-sigma"])
    pipe.set_progress_bar_config(disable=True)
    for k, (prompt, negative) in enumerate(PROMPTS):
        expected = pipe(
            prompt,
            negative_prompt=negative,
            guidance_scale=3.0 + k,
            num_inference_steps=STEPS,
            generator=torch.Generator().manual_seed(40 + k),
            height=32,
            width=32,
            use_resolution_binning=False,
            clean_caption=False,
            output_type="np",
        ).images[0]
        diff = np.abs(images[k].astype(int) - (expected * 255).round().astype(int)).max()
        assert diff <= MAX_PIXEL_DIFF, f"prompt {k}: the service's PNG is {diff}/255 off the pipeline's"


def test_a_wan_video_job_completes_and_decodes(text_service: Service) -> None:
    body = {"model": "wan", "prompt": "a cat in a boat", "size": "48x32", "num_frames": 9}
    body |= {"num_inference_steps": 4, "fps": 8}
    with text_service.client() as client:
        job = client.post("/v1/videos", json=body).json()
        done = wait_for_status(client, job["id"], {"completed", "failed"})
        assert done["status"] == "completed", done
        assert done["request"]["guidance_scale"] == 5.0  # Wan's default
        output = done["outputs"][0]
        assert (output["num_frames"], output["width"], output["height"]) == (9, 48, 32)
        data = client.get(output["url"]).content
    with av.open(io.BytesIO(data)) as container:
        frames = [frame.to_ndarray(format="rgb24") for frame in container.decode(video=0)]
    assert len(frames) == 9 and frames[0].shape == (32, 48, 3)


WAN_DOG = {"model": "wan", "prompt": "a dog"}
REFUSALS = {  # case: (path, body, error code, words the message must hold)
    "class ids to a text model": (
        "/v1/images",
        {"model": "pixart", "class_labels": [1]},
        "invalid_request",
        "takes a text prompt",
    ),
    "negative prompt to a class model": (
        "/v1/images",
        {"model": "img", "prompt": "red circle", "negative_prompt": "x"},
        "invalid_request",
        "negative_prompt is for text models",
    ),
    "size off the grid": ("/v1/videos", {**WAN_DOG, "size": "40x40"}, "unsupported_size", "multiples of 16"),
    "too many pixels": ("/v1/videos", {**WAN_DOG, "size": "1920x1088"}, "unsupported_size", "921600 pixels"),
    "frames off 1 + 4k": (
        "/v1/videos",
        {**WAN_DOG, "size": "32x32", "num_frames": 6},
        "invalid_request",
        "1 + a multiple of 4",
    ),
    "pixart off its sizes": (
        "/v1/images",
        {"model": "pixart", "prompt": "a dog", "size": "64x64"},
        "unsupported_size",
        "32x32",
    ),
}


@pytest.mark.parametrize("case", list(REFUSALS))
def test_requests_a_model_cannot_take_are_refused(text_service: Service, case: str) -> None:
    path, body, code, words = REFUSALS[case]
    before = _queued_state(text_service)
    with text_service.client() as client:
        response = client.post(path, json=body)
    assert response.status_code == 422, response.text
    assert _queued_state(text_service) == before
    error = response.json()["error"]
    assert error["code"] == code and words in error["message"], error
