"""Step caching through the service: the request field, the server's default, /v1/models, and a cached
job run by a real worker equal to the sampler's own output with that policy."""

import io
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from dit_serve.caching import CachePolicy, CachePolicyName
from models.bundled import IMAGE_MODEL_DIR
from models.loading import RowCondition, load_model
from tests.conftest import Service, api_without_workers, running_service, wait_for_status
from tests.test_contract import SPEC
from worker.sampling import generate
from worker.step_cache import RowCaches

MAX_PIXEL_DIFF = 1  # out of 255
MEASURED = CachePolicy(policy=CachePolicyName.INTERVAL, interval=3, warmup=0.25)
CACHED_SPEC = SPEC.model_copy(update={"cache_policies": ["first_block", "interval"], "cache_auto": MEASURED})
BAD_CACHE_BODIES = {
    "unknown policy name": {"cache": "teacache"},
    "a knob of another policy": {"cache": {"policy": "interval", "threshold": 0.1}},
    "threshold 0": {"cache": {"policy": "first_block", "threshold": 0}},
    "interval 1": {"cache": {"policy": "interval", "interval": 1}},
    "unknown knob": {"cache": {"policy": "interval", "every": 2}},
    "knobs on none": {"cache": {"policy": "none"}},
}


def _png(data: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(data)).convert("RGB")).astype(int)


@pytest.mark.slow
def test_requests_resolve_their_cache_and_bad_ones_are_refused(redis_url: str, tmp_path: Path) -> None:
    with (
        api_without_workers(redis_url, tmp_path, CACHED_SPEC, DIT_CACHE='["m=auto"]') as svc,
        svc.client() as client,
    ):
        models = client.get("/v1/models").json()["data"]
        assert models[0]["cache_policies"] == ["first_block", "interval"]
        assert models[0]["cache_auto"]["policy"] == "interval"

        def cache_of(**body: object) -> object:
            response = client.post("/v1/images", json={"class_labels": [1], **body})
            assert response.status_code == 202, response.text
            return response.json()["request"]["cache"]

        measured = MEASURED.model_dump(mode="json")
        assert cache_of() == measured  # the server's default for the model (--cache m=auto)
        assert cache_of(cache="none") is None
        assert cache_of(cache="first_block")["threshold"] == 0.1  # the policy's default knobs
        assert cache_of(cache={"policy": "first_block", "threshold": 0.3})["threshold"] == 0.3
        for case, body in BAD_CACHE_BODIES.items():
            response = client.post("/v1/images", json={"class_labels": [1], **body})
            assert response.status_code == 422, case
            assert response.json()["error"]["message"], case


@pytest.mark.slow
def test_a_model_without_a_block_stack_refuses_a_policy(redis_url: str, tmp_path: Path) -> None:
    with api_without_workers(redis_url, tmp_path, SPEC) as svc, svc.client() as client:
        response = client.post("/v1/images", json={"class_labels": [1], "cache": "interval"})
        assert response.status_code == 422
        assert response.json()["error"]["code"] == "unsupported_cache"
        # auto with no measured policy means no caching, so it is accepted
        accepted = client.post("/v1/images", json={"class_labels": [1], "cache": "auto"})
        assert accepted.status_code == 202 and accepted.json()["request"]["cache"] is None


@pytest.fixture(scope="module")
def bundled_service(redis_url: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Service]:
    """The bundled image model: trained blocks, whose cached residuals change its outputs (a tiny random
    DiT's zero-initialised gates leave its blocks near the identity)."""
    models = {"dit-shapes-image": IMAGE_MODEL_DIR}
    with running_service(redis_url, tmp_path_factory.mktemp("cache-service"), models) as svc:
        yield svc


@pytest.mark.slow
def test_a_cached_job_equals_the_sampler_with_its_policy(bundled_service: Service) -> None:
    body = {"class_labels": [3], "seed": 11, "num_inference_steps": 12, "guidance_scale": 4.0}
    policy = {"policy": "interval", "interval": 3, "warmup": 0.25}
    with bundled_service.client() as client:
        jobs = [client.post("/v1/images", json={**body, "cache": cache}).json() for cache in (policy, "none")]
        pixels = []
        for job in jobs:
            done = wait_for_status(client, job["id"], {"completed", "failed"})
            assert done["status"] == "completed", done
            pixels.append(_png(client.get(done["outputs"][0]["url"]).content))
    assert jobs[0]["request"]["cache"]["interval"] == 3
    model = load_model("dit-shapes-image", IMAGE_MODEL_DIR, torch.device("cpu"))
    caches = RowCaches.of([CachePolicy.model_validate(policy)])
    expected, _ = generate(model, [RowCondition(class_label=3)], [11], [4.0], 12, 32, 32, caches=caches)
    assert caches.rows[0].skipped > 0
    assert np.abs(pixels[0] - expected[0].numpy().astype(int)).max() <= MAX_PIXEL_DIFF
    assert np.abs(pixels[0] - pixels[1]).max() > MAX_PIXEL_DIFF  # the cache changed the output
