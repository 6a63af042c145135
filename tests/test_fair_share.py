"""Fair share, priorities and per-key limits end to end: real API and worker processes with auth on,
over HTTP, on a real Redis."""

import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from redis import Redis

from dit_serve.contract import Priority
from dit_serve.jobs import RecordField, record_key
from dit_serve.keys import create_key
from tests.conftest import Service, paused, running_service

pytestmark = pytest.mark.slow

FLOOD = 64
MAX_BATCH = 4
AGING_S = 1.0
JOB = {"model": "img", "class_labels": [1], "num_inference_steps": 2}


@pytest.fixture(scope="module")
def keyed(
    redis_url: str, model_dirs: dict[str, Path], tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Service]:
    """API (auth on, low jobs promoted after AGING_S) + one worker taking at most MAX_BATCH rows per batch."""
    with running_service(
        redis_url,
        tmp_path_factory.mktemp("fair"),
        {"img": model_dirs["img"]},
        {"DIT_AUTH": "on", "DIT_PRIORITY_AGING_S": str(AGING_S)},
        DIT_MAX_BATCH=str(MAX_BATCH),
    ) as svc:
        yield svc


def _client(svc: Service, name: str, **limits: object) -> httpx.Client:
    _, secret = create_key(Redis.from_url(svc.redis_url), name, **limits)  # type: ignore[arg-type]
    return httpx.Client(base_url=svc.base_url, timeout=30, headers={"Authorization": f"Bearer {secret}"})


def _post(client: httpx.Client, **fields: object) -> str:
    response = client.post("/v1/images", json={**JOB, **fields})
    assert response.status_code == 202, response.text
    return response.json()["id"]


def _wait_all(client: httpx.Client, job_ids: list[str]) -> None:
    for job_id in job_ids:
        job = client.get(f"/v1/jobs/{job_id}", params={"wait": 60}).json()
        assert job.get("status") == "completed", job


def _times(redis: Redis, job_id: str) -> tuple[float, float, str]:
    started, completed, execution = redis.hmget(
        record_key(job_id), [RecordField.STARTED_AT, RecordField.COMPLETED_AT, RecordField.EXECUTION]
    )
    return float(started), float(completed), execution.decode()  # type: ignore[arg-type,union-attr]


def test_one_job_of_a_second_key_finishes_before_the_flooding_keys_32nd(keyed: Service) -> None:
    a, b = _client(keyed, "flooder"), _client(keyed, "single")
    redis = Redis.from_url(keyed.redis_url)
    with paused(keyed.workers[0]):  # all 65 are queued before the worker takes any
        flood = [_post(a) for _ in range(FLOOD)]
        single = _post(b)
        assert b.get(f"/v1/jobs/{single}").json()["queue_position"] <= 1  # its turn, not 64th
    _wait_all(a, flood)
    _wait_all(b, [single])
    assert _times(redis, single)[1] < _times(redis, flood[31])[1]
    assert _times(redis, single)[2] == _times(redis, flood[0])[2]  # taken in the very first batch


def test_a_high_job_sent_behind_64_normal_ones_runs_in_the_next_batch(keyed: Service) -> None:
    client = _client(keyed, "operator", max_priority=Priority.HIGH)
    redis = Redis.from_url(keyed.redis_url)
    with paused(keyed.workers[0]):
        normal = [_post(client) for _ in range(FLOOD)]
        high = _post(client, priority="high")
        assert client.get(f"/v1/jobs/{high}").json()["queue_position"] == 0
    _wait_all(client, [*normal, high])
    first_batch = min((_times(redis, job_id) for job_id in [*normal, high]), key=lambda times: times[0])[2]
    assert _times(redis, high)[2] == first_batch
    # ... and batching across requests stays: it shared that batch with normal jobs.
    assert sum(_times(redis, job_id)[2] == first_batch for job_id in normal) == MAX_BATCH - 1


def test_a_low_job_that_waited_past_the_aging_time_takes_its_turn_among_normal_ones(keyed: Service) -> None:
    a, b = _client(keyed, "busy"), _client(keyed, "patient")
    redis = Redis.from_url(keyed.redis_url)
    with paused(keyed.workers[0]):
        normal = [_post(a) for _ in range(4 * MAX_BATCH)]
        low = _post(b, priority="low")
        assert b.get(f"/v1/jobs/{low}").json()["queue_position"] == len(normal)  # behind every normal job
        time.sleep(AGING_S + 0.2)
    _wait_all(a, normal)
    _wait_all(b, [low])
    first_batch = min((_times(redis, job_id) for job_id in normal), key=lambda times: times[0])[2]
    assert _times(redis, low)[2] == first_batch  # promoted to normal, with its key's fair turn


def test_a_request_gets_at_most_its_keys_priority(keyed: Service) -> None:
    capped = _client(keyed, "capped", max_priority=Priority.LOW)
    plain = _client(keyed, "plain")
    asked_high = capped.post("/v1/images", json={**JOB, "priority": "high"}).json()
    assert asked_high["request"]["priority"] == "low"
    assert (
        plain.post("/v1/images", json={**JOB, "priority": "high"}).json()["request"]["priority"] == "normal"
    )
    assert plain.post("/v1/images", json={**JOB, "priority": "low"}).json()["request"]["priority"] == "low"
    refused = plain.post("/v1/images", json={**JOB, "priority": "urgent"})
    assert refused.status_code == 422 and "priority" in refused.json()["error"]["message"]


def test_rate_limit_is_a_429_with_retry_after(keyed: Service) -> None:
    client = _client(keyed, "metered", rate_per_min=3)
    assert [client.post("/v1/images", json=JOB).status_code for _ in range(3)] == [202] * 3
    limited = client.post("/v1/images", json=JOB)
    assert limited.status_code == 429 and limited.json()["error"]["code"] == "rate_limited"
    assert 1 <= int(limited.headers["Retry-After"]) <= 20  # a token every 20 s
    assert _client(keyed, "unmetered").post("/v1/images", json=JOB).status_code == 202  # per key
    metrics = httpx.get(f"{keyed.base_url}/metrics", timeout=30).text
    assert 'dit_jobs_rejected_total{kind="image",reason="rate_limited"} 1.0' in metrics


def test_quota_counts_queued_and_running_jobs(keyed: Service) -> None:
    client = _client(keyed, "quota", max_queued=2)
    with paused(keyed.workers[0]):
        first = [_post(client) for _ in range(2)]
        over = client.post("/v1/images", json=JOB)
        assert over.status_code == 429 and over.json()["error"]["code"] == "quota_exceeded"
        assert 1 <= int(over.headers["Retry-After"]) <= 60
        metrics = httpx.get(f"{keyed.base_url}/metrics", timeout=30).text
        assert 'dit_jobs_rejected_total{kind="image",reason="quota_exceeded"} 1.0' in metrics
        assert client.delete(f"/v1/jobs/{first[0]}").status_code == 200
        third = _post(client)  # the canceled job freed its slot
    _wait_all(client, [first[1], third])
    _post(client)  # ended jobs do not count
