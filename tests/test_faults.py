"""Cancel and crash safety, with a slow model so jobs are really in flight: real processes, real kill -9."""

import json
import os
import signal
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from redis import Redis

from dit_serve.embedded_redis import free_port
from dit_serve.jobs import STORAGE_FAILED_ERROR
from tests.conftest import (
    SHORT_SCHEDULE_TIMESTEPS,
    Service,
    metric,
    sampling_fails_then_serves,
    scrape,
    wait_for_status,
)

pytestmark = pytest.mark.slow
RECOVERY_LIMIT_S = 60.0  # the promise: no job of a killed worker stays in_progress longer


@pytest.fixture
def slow_service(redis_url: str, model_dirs: dict[str, Path], tmp_path: Path) -> Iterator[Service]:
    Redis.from_url(redis_url).flushdb()
    svc = Service(redis_url, tmp_path, {"slow": model_dirs["slow"]}, {"DIT_DEFAULT_MODEL": "slow"})
    try:
        svc.start_api()
        yield svc
    finally:
        svc.stop()
        Redis.from_url(redis_url).flushdb()


def _video(client, steps: int, label: str = "red circle moving left") -> str:  # type: ignore[no-untyped-def]
    response = client.post(
        "/v1/videos", json={"prompt": label, "num_inference_steps": steps, "num_frames": 16}
    )
    assert response.status_code == 202, response.text
    return response.json()["id"]


def _wait_progress(client, job_id: str, timeout_s: float = 60.0) -> dict:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        job = client.get(f"/v1/jobs/{job_id}").json()
        if job["status"] == "in_progress" and job["progress"] > 0:
            return job
        time.sleep(0.02)
    raise AssertionError(f"job {job_id} never made progress")


def test_cancel_queued_and_in_progress_jobs(slow_service: Service) -> None:
    slow_service.start_worker()
    redis = Redis.from_url(slow_service.redis_url)
    with slow_service.client() as client:
        blocker = _video(client, 25)
        _wait_progress(client, blocker)
        pair = [_video(client, 40), _video(client, 40, "blue square moving up")]  # compatible: one batch
        queued = _video(client, 41)
        job = client.get(f"/v1/jobs/{queued}").json()
        assert job["status"] == "queued" and job["queue_position"] == 2

        response = client.delete(f"/v1/jobs/{queued}")
        assert response.status_code == 200 and response.json()["status"] == "canceled"
        assert client.get(f"/v1/jobs/{pair[1]}").json()["queue_position"] == 1

        _wait_progress(client, pair[0])
        assert redis.hget(f"dit:job:{pair[0]}", "execution") == redis.hget(f"dit:job:{pair[1]}", "execution")
        response = client.delete(f"/v1/jobs/{pair[0]}")
        assert response.status_code == 202 and response.json()["status"] == "in_progress"
        canceled = wait_for_status(client, pair[0], {"canceled", "completed", "failed"})
        survivor = wait_for_status(client, pair[1], {"completed", "failed", "canceled"})
        never_ran = client.get(f"/v1/jobs/{queued}").json()

        assert canceled["status"] == "canceled" and canceled["progress"] < 100 and canceled["outputs"] == []
        assert (
            survivor["status"] == "completed" and len(survivor["outputs"]) == 1
        )  # the rest of the batch carried on
        assert client.get(survivor["outputs"][0]["url"]).status_code == 200
        assert never_ran["status"] == "canceled" and never_ran["started_at"] is None
        conflict = client.delete(f"/v1/jobs/{pair[1]}")
        assert conflict.status_code == 409 and conflict.json()["error"]["code"] == "job_finished"
    assert "canceled at step" in slow_service.worker_log()
    api = scrape(f"{slow_service.base_url}/metrics")
    assert metric(api, "dit_cancels_total", model="slow", outcome="canceled") == 1
    assert metric(api, "dit_cancels_total", model="slow", outcome="cancel_requested") == 1


def test_killed_worker_jobs_are_requeued_and_finished_by_another(slow_service: Service) -> None:
    victim = slow_service.start_worker()
    with slow_service.client() as client:
        ids = [
            _video(client, 60, label)
            for label in ("red circle moving left", "green square moving up", "blue triangle moving down")
        ]
        for job_id in ids:
            _wait_progress(client, job_id)
        os.kill(victim.pid, signal.SIGKILL)
        victim.wait()
        killed_at = time.monotonic()
        # Nobody is left to reap but the API: it must put the jobs back on their own.
        while any(client.get(f"/v1/jobs/{job_id}").json()["status"] == "in_progress" for job_id in ids):
            assert time.monotonic() - killed_at < RECOVERY_LIMIT_S, (
                "jobs of a killed worker still in_progress"
            )
            time.sleep(0.5)
        assert {client.get(f"/v1/jobs/{job_id}").json()["status"] for job_id in ids} == {"queued"}
        lost = scrape(f"{slow_service.base_url}/metrics")
        assert metric(lost, "dit_jobs_reaped_total", model="slow", outcome="requeued") == 3

        slow_service.start_worker()
        finished = [wait_for_status(client, job_id, {"completed", "failed"}, timeout_s=120) for job_id in ids]
    assert [job["status"] for job in finished] == ["completed"] * 3
    redis = Redis.from_url(slow_service.redis_url)
    assert [int(redis.hget(f"dit:job:{job_id}", "attempts")) for job_id in ids] == [2, 2, 2]


def test_job_without_retries_fails_with_worker_lost(
    redis_url: str, model_dirs: dict[str, Path], tmp_path: Path
) -> None:
    Redis.from_url(redis_url).flushdb()
    fast_reaping = {
        "DIT_JOB_RETRIES": "0",
        "DIT_HEARTBEAT_TTL_S": "3",
        "DIT_HEARTBEAT_INTERVAL_S": "0.5",
        "DIT_REAP_INTERVAL_S": "0.5",
    }
    svc = Service(
        redis_url, tmp_path, {"slow": model_dirs["slow"]}, {"DIT_DEFAULT_MODEL": "slow", **fast_reaping}
    )
    try:
        svc.start_api()
        victim = svc.start_worker()
        with svc.client() as client:
            job_id = _video(client, 80)
            _wait_progress(client, job_id)
            os.kill(victim.pid, signal.SIGKILL)
            failed = wait_for_status(
                client, job_id, {"failed", "queued", "completed"}, timeout_s=RECOVERY_LIMIT_S
            )
        assert failed["status"] == "failed"
        assert failed["error"]["code"] == "worker_lost"
        lost = scrape(f"{svc.base_url}/metrics")
        assert metric(lost, "dit_jobs_reaped_total", model="slow", outcome="failed") == 1
    finally:
        svc.stop()
        Redis.from_url(redis_url).flushdb()


def test_sigterm_lets_the_worker_finish_its_batch(slow_service: Service) -> None:
    worker = slow_service.start_worker()
    with slow_service.client() as client:
        assert client.get("/readyz").status_code == 200
        job_id = _video(client, 40)
        _wait_progress(client, job_id)
        worker.send_signal(signal.SIGTERM)
        worker.wait(timeout=60)
        job = client.get(f"/v1/jobs/{job_id}").json()
        not_ready = client.get("/readyz")
    assert worker.returncode == 0
    assert job["status"] == "completed"  # warm shutdown: the batch in flight was finished, not dropped
    assert slow_service.live_workers() == []  # and the worker deregistered itself
    assert not_ready.status_code == 503 and not_ready.json()["error"]["code"] == "no_worker"


def test_without_a_live_worker_the_api_is_alive_but_not_ready(slow_service: Service) -> None:
    with slow_service.client() as client:
        ready = client.get("/readyz")
        assert ready.status_code == 503
        error = ready.json()["error"]
        assert (error["code"], error["message"]) == (
            "no_worker",
            "no live worker: start one with `dit-serve worker`",
        )
        assert error["request_id"] == ready.headers["X-Request-ID"]  # a 5xx names its request
        assert client.get("/healthz").status_code == 200
        assert client.get("/v1/models").json()["data"] == []


def test_a_job_whose_sampling_raises_fails_with_sampling_failed(
    slow_service: Service, short_schedule_model: Path
) -> None:
    worker_metrics = free_port()
    worker = slow_service.start_worker(
        DIT_MODELS=json.dumps([f"short={short_schedule_model}"]), DIT_METRICS_PORT=str(worker_metrics)
    )
    too_many = {
        "model": "short",
        "class_labels": [3],
        "n": 2,
        "num_inference_steps": SHORT_SCHEDULE_TIMESTEPS + 1,
    }
    with slow_service.client() as client:  # the worker goes on serving that model
        done = sampling_fails_then_serves(slow_service, client, too_many, SHORT_SCHEDULE_TIMESTEPS)
    assert len(done["outputs"]) == 2
    assert worker.poll() is None and "sampling failed for batch" in slow_service.worker_log()
    counted = scrape(f"http://127.0.0.1:{worker_metrics}/metrics")
    image = {"model": "short", "kind": "image"}
    assert metric(counted, "dit_jobs_finished_total", **image, status="failed", code="sampling_failed") == 1
    assert metric(counted, "dit_jobs_finished_total", **image, status="completed", code="") == 1


def test_a_redis_restart_mid_job_loses_nothing(model_dirs: dict[str, Path], tmp_path: Path) -> None:
    from dit_serve.embedded_redis import EmbeddedRedis

    server = EmbeddedRedis(tmp_path / "redis", persistent=True).start()
    svc = Service(server.url, tmp_path, {"slow": model_dirs["slow"]}, {"DIT_DEFAULT_MODEL": "slow"})
    try:
        svc.start_api()
        svc.start_worker()
        with svc.client() as client:
            job_id = _video(client, 100)
            _wait_progress(client, job_id)
            # No wait for the append-only file's once-a-second fsync: a SIGTERMed Redis fsyncs it as it
            # shuts down, and any wait here could let a fast machine finish the job before the stop.
            running = client.get(f"/v1/jobs/{job_id}").json()
            stopped_at = time.time()
            server.stop()
            # the job was mid-flight when Redis went: the restart is survived, not dodged
            assert running["status"] == "in_progress" and 0 < running["progress"] < 100, running
            down = client.post("/v1/videos", json={"prompt": "red circle moving left"})
            assert down.status_code == 503 and down.json()["error"]["code"] == "redis_unavailable"
            time.sleep(2)
            server.start()  # same port, same directory: the append-only file brings the jobs back
            job = wait_for_status(client, job_id, {"completed", "failed", "canceled"}, timeout_s=90)
        assert job["status"] == "completed" and job["progress"] == 100, job
        assert job["completed_at"] > stopped_at  # recorded once Redis was back
        # finished by the run that was in flight, not reaped and run again
        assert Redis.from_url(server.url).hget(f"dit:job:{job_id}", "attempts") == b"1"
    finally:
        svc.stop()
        server.stop()


def test_a_storage_failure_fails_the_job_with_a_clear_error(
    redis_url: str, model_dirs: dict[str, Path], tmp_path: Path
) -> None:
    Redis.from_url(redis_url).flushdb()
    outputs = tmp_path / "broken-outputs"
    outputs.mkdir()
    (outputs / "jobs").write_text("a file where the jobs directory should be")
    svc = Service(redis_url, tmp_path, {"img": model_dirs["img"]}, {"DIT_OUTPUT_DIR": str(outputs)})
    try:
        svc.start_api()
        worker_metrics = free_port()
        svc.start_worker(DIT_METRICS_PORT=str(worker_metrics))
        with svc.client() as client:
            job = client.post("/v1/images", json={"prompt": "red circle", "num_inference_steps": 2}).json()
            failed = wait_for_status(client, job["id"], {"completed", "failed"})
            assert failed["status"] == "failed"
            assert failed["error"] == STORAGE_FAILED_ERROR.model_dump()  # what to do, no OS error text
            assert str(outputs) not in failed["error"]["message"]
            # the cause is in the worker's log, with the job id
            assert f"storing outputs of job {job['id']} failed" in svc.worker_log()
            assert "NotADirectoryError" in svc.worker_log() or "FileExistsError" in svc.worker_log()
            counted = scrape(f"http://127.0.0.1:{worker_metrics}/metrics")
            image = {"model": "img", "kind": "image"}
            assert (
                metric(counted, "dit_jobs_finished_total", **image, status="failed", code="storage_failed")
                == 1
            )
            assert metric(counted, "dit_jobs_finished_total", **image, status="completed", code="") == 0
            # The worker is still serving after the failure.
            assert client.get("/readyz").status_code == 200
    finally:
        svc.stop()
        Redis.from_url(redis_url).flushdb()
