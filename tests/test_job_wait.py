"""`GET /v1/jobs/{id}?wait=N`: one request that answers when the job ends, for every waiter."""

import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from redis import Redis

from dit_serve.jobs import ended_key
from tests.conftest import Service, running_service

WAIT_S = 30  # far above any job here: a waiter that answers well before it was woken by the job's end


@pytest.fixture(scope="module")
def service(
    redis_url: str, model_dirs: dict[str, Path], tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Service]:
    """The fast image model, and the slow video model so that a job is really in flight."""
    models = {"img": model_dirs["img"], "slow": model_dirs["slow"]}
    with running_service(redis_url, tmp_path_factory.mktemp("wait"), models) as svc:
        yield svc


SLOW_VIDEO = {"model": "slow", "prompt": "red circle moving left", "num_inference_steps": 100}


def _timed_wait(service: Service, job_id: str, wait: float = WAIT_S) -> tuple[dict, float]:
    with service.client() as client:
        began = time.monotonic()
        body = client.get(f"/v1/jobs/{job_id}", params={"wait": wait}, timeout=wait + 10).json()
        return body, time.monotonic() - began


def test_two_waiters_get_the_completed_job_in_one_request_each(service: Service) -> None:
    with service.client() as client:
        job = client.post("/v1/images", json={"prompt": "red circle", "num_inference_steps": 50}).json()
    with ThreadPoolExecutor(2) as pool:
        waits = list(pool.map(lambda _: _timed_wait(service, job["id"]), range(2)))
    for body, elapsed in waits:
        assert body["status"] == "completed" and body["progress"] == 100 and body["outputs"]
        assert elapsed < WAIT_S / 2, f"the waiter slept {elapsed:.1f} s instead of waking at the job's end"
    # an ended job answers at once however long the wait asked for
    body, elapsed = _timed_wait(service, job["id"])
    assert body["status"] == "completed" and elapsed < WAIT_S / 2
    # the worker signalled the end once, and the waiters' BLMOVE left the signal for later waiters
    assert Redis.from_url(service.redis_url).llen(ended_key(job["id"])) == 1


def test_a_cancel_wakes_the_waiter(service: Service) -> None:
    with service.client() as client:
        job = client.post("/v1/videos", json=SLOW_VIDEO).json()
        with ThreadPoolExecutor(1) as pool:
            waiter = pool.submit(_timed_wait, service, job["id"])
            time.sleep(0.3)
            assert client.delete(f"/v1/jobs/{job['id']}").status_code in (200, 202)
            body, elapsed = waiter.result()
    assert body["status"] == "canceled" and elapsed < WAIT_S / 2
    assert Redis.from_url(service.redis_url).llen(ended_key(job["id"])) == 1


def test_without_wait_a_running_job_answers_at_once(service: Service) -> None:
    with service.client() as client:
        job = client.post("/v1/videos", json=SLOW_VIDEO).json()
        body = client.get(f"/v1/jobs/{job['id']}").json()
        assert body["status"] in ("queued", "in_progress")
        client.delete(f"/v1/jobs/{job['id']}")


@pytest.mark.parametrize("wait", ["-1", "61", "soon"])
def test_a_bad_wait_is_a_422(service: Service, wait: str) -> None:
    with service.client() as client:
        job = client.post("/v1/images", json={"prompt": "red circle"}).json()
        response = client.get(f"/v1/jobs/{job['id']}", params={"wait": wait})
    assert response.status_code == 422 and response.json()["error"]["code"] == "invalid_request"
    assert "wait" in response.json()["error"]["message"]


def test_waiting_on_an_unknown_job_is_a_404_at_once(service: Service) -> None:
    body, elapsed = _timed_wait(service, "0" * 32)
    assert body["error"]["code"] == "job_not_found" and elapsed < WAIT_S / 2
