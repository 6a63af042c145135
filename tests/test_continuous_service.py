"""Continuous batching in a real worker: a job joins a running batch mid-flight, unchanged by it,
with DDIM (the tiny DiT) and with a multistep solver (DPM-Solver++, the tiny PixArt-Σ).

A job whose batch cannot be sampled fails with sampling_failed, and the worker serves on.
"""

import io
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from dit_serve.embedded_redis import free_port
from tests.conftest import (
    SHORT_SCHEDULE_TIMESTEPS,
    Service,
    metric,
    running_service,
    sampling_fails_then_serves,
    scrape,
    wait_for_status,
)

MAX_PIXEL_DIFF = 1  # out of 255
LONG = {"class_labels": [3], "n": 8, "num_inference_steps": 100, "seed": 100}
JOINER = {"class_labels": [17], "num_inference_steps": 100, "seed": 7, "guidance_scale": 6.0}
# Seconds of denoising even on a fast machine (the image batch above takes well under one), so that a
# test can see one job running beside another before it cancels either.
SLOW_VIDEO = {"model": "slow", "prompt": "red circle moving left", "num_inference_steps": 100}
# Long enough that the joiner is taken while the first job still denoises, short enough to be quick.
PIXART_LONG = {"model": "pixart", "prompt": "a red fox under the sky", "n": 2, "num_inference_steps": 30}
PIXART_JOINER = {
    "model": "pixart",
    "prompt": "a small bird",
    "negative_prompt": "blurry",
    "num_inference_steps": 30,
    "seed": 9,
    "guidance_scale": 6.0,
}
RUN_STARTED = "continuous batch started"  # the worker's log line when a run (not a joiner) begins
DENOISED = 95  # a job's progress once its denoising is done (decode, encode and store remain)


@pytest.fixture(scope="module")
def continuous_service(
    redis_url: str,
    model_dirs: dict[str, Path],
    short_schedule_model: Path,
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[Service]:
    tmp = tmp_path_factory.mktemp("continuous")
    worker_metrics = str(free_port())
    models = {
        "img": model_dirs["img"],
        "slow": model_dirs["slow"],
        "short": short_schedule_model,
        "pixart": model_dirs["pixart-sigma"],
    }
    with running_service(
        redis_url, tmp, models, DIT_BATCHING="continuous", DIT_METRICS_PORT=worker_metrics
    ) as svc:
        svc.worker_metrics = f"http://127.0.0.1:{worker_metrics}/metrics"  # type: ignore[attr-defined]
        yield svc


def _png(service: Service, job: dict, index: int = 0) -> np.ndarray:
    with service.client() as client:
        data = client.get(job["outputs"][index]["url"]).content
    return np.asarray(Image.open(io.BytesIO(data)).convert("RGB")).astype(int)


def test_a_job_joins_a_running_batch_and_matches_its_solo_run(continuous_service: Service) -> None:
    before = scrape(continuous_service.worker_metrics)  # type: ignore[attr-defined]
    with continuous_service.client() as client:
        long_job = client.post("/v1/images", json=LONG).json()
        wait_for_status(client, long_job["id"], {"in_progress"}, timeout_s=30)
        joiner = client.post("/v1/images", json=JOINER).json()
        joined = client.get(f"/v1/jobs/{joiner['id']}", params={"wait": 60}).json()
        long_done = client.get(f"/v1/jobs/{long_job['id']}", params={"wait": 60}).json()
        assert joined["status"] == long_done["status"] == "completed"
        # it started while the long job was still denoising: it did not wait for the batch to end
        assert joined["started_at"] < long_done["completed_at"]
        assert long_done["progress"] == 100 and len(long_done["outputs"]) == 8
        # the same request alone, now that nothing else runs
        alone = client.post("/v1/images", json=JOINER).json()
        alone = client.get(f"/v1/jobs/{alone['id']}", params={"wait": 60}).json()
    diff = np.abs(_png(continuous_service, joined) - _png(continuous_service, alone)).max()
    assert diff <= MAX_PIXEL_DIFF, f"joining mid-flight changed the output by {diff}/255"

    # The metrics of continuous batching: every row went through its 100 steps exactly once.
    after = scrape(continuous_service.worker_metrics)  # type: ignore[attr-defined]
    img = {"model": "img", "kind": "image"}

    def moved(name: str, **labels: str) -> float:
        return metric(after, name, **labels) - metric(before, name, **labels)

    rows = LONG["n"] + 1 + 1  # the long job's outputs, the joiner, the joiner alone
    assert moved("dit_batch_rows_sum", **img) == rows * JOINER["num_inference_steps"]
    assert moved("dit_denoise_step_seconds_count", **img) >= 2 * JOINER["num_inference_steps"]
    assert moved("dit_jobs_finished_total", **img, status="completed", code="") == 3
    assert moved("dit_images_generated_total", model="img") == rows
    assert moved("dit_storage_write_seconds_count", **img) == rows
    assert moved("dit_job_latency_seconds_count", **img) == moved("dit_queue_wait_seconds_count", **img) == 3


def test_a_pixart_job_joins_a_running_dpm_solver_batch_and_matches_its_solo_run(
    continuous_service: Service,
) -> None:
    runs_before = continuous_service.worker_log().count(RUN_STARTED)
    with continuous_service.client() as client:
        long_job = client.post("/v1/images", json=PIXART_LONG).json()
        wait_for_status(client, long_job["id"], {"in_progress"}, timeout_s=30)
        joiner = client.post("/v1/images", json=PIXART_JOINER).json()
        joined = client.get(f"/v1/jobs/{joiner['id']}", params={"wait": 60}).json()
        long_done = client.get(f"/v1/jobs/{long_job['id']}", params={"wait": 60}).json()
        assert joined["status"] == long_done["status"] == "completed"
        assert joined["started_at"] < long_done["completed_at"]
        alone = client.post("/v1/images", json=PIXART_JOINER).json()
        alone = client.get(f"/v1/jobs/{alone['id']}", params={"wait": 60}).json()
    diff = np.abs(_png(continuous_service, joined) - _png(continuous_service, alone)).max()
    assert diff <= MAX_PIXEL_DIFF, f"joining a DPM-Solver++ batch mid-flight changed the output by {diff}/255"
    # two continuous runs: the long job's, which the joiner joined, and the solo one's
    assert continuous_service.worker_log().count(RUN_STARTED) == runs_before + 2


def test_cancel_in_a_continuous_batch_leaves_the_job_that_joined_it(continuous_service: Service) -> None:
    runs_before = continuous_service.worker_log().count(RUN_STARTED)
    with continuous_service.client() as client:
        long_job = client.post("/v1/videos", json=SLOW_VIDEO).json()
        wait_for_status(client, long_job["id"], {"in_progress"}, timeout_s=30)
        other = client.post("/v1/videos", json={**SLOW_VIDEO, "prompt": "blue square moving up"}).json()
        wait_for_status(client, other["id"], {"in_progress"}, timeout_s=30)
        # the other job is running while the long one still denoises: it joined the long job's batch
        long_now = client.get(f"/v1/jobs/{long_job['id']}").json()
        assert long_now["status"] == "in_progress" and long_now["progress"] < DENOISED, long_now
        assert client.delete(f"/v1/jobs/{long_job['id']}").status_code == 202
        canceled = client.get(f"/v1/jobs/{long_job['id']}", params={"wait": 60}).json()
        finished = client.get(f"/v1/jobs/{other['id']}", params={"wait": 60}).json()
    assert canceled["status"] == "canceled" and canceled["outputs"] == []
    assert finished["status"] == "completed" and len(finished["outputs"]) == 1
    assert finished["started_at"] < canceled["completed_at"]
    # one run held both jobs, and went on with the other after the cancel
    log = continuous_service.worker_log()
    assert log.count(RUN_STARTED) == runs_before + 1
    assert f"job {long_job['id']} canceled at step" in log


def test_a_job_whose_sampling_raises_fails_and_the_worker_serves_on(continuous_service: Service) -> None:
    before = scrape(continuous_service.worker_metrics)  # type: ignore[attr-defined]
    too_many = {"model": "short", "class_labels": [3], "num_inference_steps": SHORT_SCHEDULE_TIMESTEPS + 1}
    with continuous_service.client() as client:  # the same worker goes on serving that model
        sampling_fails_then_serves(continuous_service, client, too_many, SHORT_SCHEDULE_TIMESTEPS)
    assert continuous_service.workers[0].poll() is None
    after = scrape(continuous_service.worker_metrics)  # type: ignore[attr-defined]
    sampling_failed = {"model": "short", "kind": "image", "status": "failed", "code": "sampling_failed"}
    counted = [metric(samples, "dit_jobs_finished_total", **sampling_failed) for samples in (before, after)]
    assert counted[1] - counted[0] == 1
