"""Deadlines: a job not started within its queue_timeout_s fails with queue_timeout and never starts."""

import time
from pathlib import Path

import pytest
from redis import Redis
from rq import Queue

from dit_serve.jobs import JobRecord, queue_name, record_key
from dit_serve.queueing import DEADLINES_KEY, enqueue_job, reap_lost_jobs
from tests.conftest import Service, paused, wait_for_status
from tests.test_contract import SPEC, _request

QUEUE = queue_name(SPEC.name)
TTL_S = 3600


def _enqueue(redis: Redis, job_id: str, queue_timeout_s: int | None, age_s: float) -> None:
    record = JobRecord.new(_request(queue_timeout_s=queue_timeout_s))
    enqueue_job(
        redis, job_id, record.model_copy(update={"created_at": time.time() - age_s}), retries=0, ttl_s=TTL_S
    )


def _status(redis: Redis, job_id: str) -> str:
    return (redis.hget(f"rq:job:{job_id}", "status") or b"").decode()


def test_a_worker_never_takes_a_job_past_its_deadline(redis: Redis) -> None:
    from worker.queue import JobQueue

    _enqueue(redis, "late", queue_timeout_s=5, age_s=6)
    _enqueue(redis, "in-time", queue_timeout_s=5, age_s=1)
    _enqueue(redis, "no-limit", queue_timeout_s=None, age_s=10_000)
    taken = JobQueue(redis, [QUEUE], "w1", 30, TTL_S).take(QUEUE, 16, "e1")
    assert sorted(ticket.job_id for ticket in taken) == ["in-time", "no-limit"]
    assert _status(redis, "late") == "failed"  # failed at once by the worker that skipped it
    error = JobRecord.from_hash(redis.hgetall(record_key("late"))).error  # type: ignore[arg-type]
    assert error is not None and error.code == "queue_timeout" and "queue_timeout_s (5 s)" in error.message
    assert redis.lrange("dit:ended:late", 0, -1) == [b"1"]
    assert Queue(QUEUE, connection=redis).get_job_ids() == []


def test_the_reaper_ends_expired_jobs_and_only_queued_ones(redis: Redis) -> None:
    _enqueue(redis, "late", queue_timeout_s=2, age_s=3)
    _enqueue(redis, "waiting", queue_timeout_s=60, age_s=0)
    redis.hset("rq:job:started-late", "status", "started")  # a started job is never failed for its deadline
    redis.zadd(DEADLINES_KEY, {"started-late": time.time() - 1})
    reap_lost_jobs(redis, None, TTL_S)
    assert (_status(redis, "late"), _status(redis, "waiting"), _status(redis, "started-late")) == (
        "failed",
        "queued",
        "started",
    )
    assert redis.zrange(DEADLINES_KEY, 0, -1) == [b"waiting"]  # handled deadlines leave the index


@pytest.mark.slow
def test_a_job_queued_past_its_timeout_fails_and_never_starts(
    redis_url: str, model_dirs: dict[str, Path], tmp_path: Path
) -> None:
    Redis.from_url(redis_url).flushdb()
    svc = Service(redis_url, tmp_path, {"img": model_dirs["img"]}, {"DIT_REAP_INTERVAL_S": "0.5"})
    try:
        svc.start_api()
        worker = svc.start_worker()
        with svc.client() as client:
            for bad in (0, 86_401, "soon"):
                refused = client.post("/v1/images", json={"prompt": "red circle", "queue_timeout_s": bad})
                assert refused.status_code == 422 and "queue_timeout_s" in refused.json()["error"]["message"]
            with paused(worker):  # nothing starts while the worker is stopped
                doomed = client.post("/v1/images", json={"prompt": "red circle", "queue_timeout_s": 1})
                patient = client.post("/v1/images", json={"prompt": "red circle", "queue_timeout_s": 600})
                assert doomed.status_code == patient.status_code == 202
                failed = wait_for_status(client, doomed.json()["id"], {"failed", "completed"}, timeout_s=15)
            assert failed["error"]["code"] == "queue_timeout" and failed["started_at"] is None
            done = wait_for_status(client, patient.json()["id"], {"completed", "failed"})
            assert done["status"] == "completed" and done["request"]["queue_timeout_s"] == 600
            after = client.get(f"/v1/jobs/{doomed.json()['id']}").json()
        assert after["status"] == "failed" and after["started_at"] is None  # and it never started later
        assert Redis.from_url(redis_url).hget(f"dit:job:{doomed.json()['id']}", "attempts") is None
    finally:
        svc.stop()
        Redis.from_url(redis_url).flushdb()
