"""Orphaned jobs: a queued job whose model has no live worker fails with no_worker, not queued forever."""

import os
import signal
import time
from pathlib import Path

import pytest
from redis import Redis
from rq import Queue

from dit_serve.catalog import SERVED_UNTIL_KEY, publish_worker
from dit_serve.jobs import JobRecord, RecordField, queue_name, record_key
from dit_serve.queueing import enqueue_job, fail_orphaned_jobs, reap_lost_jobs
from tests.conftest import Service, wait_for_status
from tests.test_contract import SPEC, _request

TTL_S = 3600
ORPHAN_S = 300.0
HEARTBEAT_TTL_S = 3


def _enqueue(redis: Redis, job_id: str, model: str = SPEC.name, age_s: float = 0.0) -> None:
    record = JobRecord.new(_request(model=model)).model_copy(update={"created_at": time.time() - age_s})
    enqueue_job(redis, job_id, record, retries=0, ttl_s=TTL_S)


def _status(redis: Redis, job_id: str) -> str:
    return (redis.hget(f"rq:job:{job_id}", "status") or b"").decode()


def test_only_jobs_without_a_worker_for_the_timeout_fail(redis: Redis) -> None:
    _enqueue(redis, "old", age_s=ORPHAN_S + 5)  # model never served, accepted long ago
    _enqueue(redis, "fresh", age_s=1)  # model never served, but accepted just now: give it time
    _enqueue(redis, "served", model="other", age_s=ORPHAN_S + 5)
    publish_worker(redis, "w", [SPEC.model_copy(update={"name": "other"})], ttl_s=30)
    assert fail_orphaned_jobs(redis, ORPHAN_S, TTL_S) == 1
    assert [_status(redis, job) for job in ("old", "fresh", "served")] == ["failed", "queued", "queued"]
    assert Queue(queue_name(SPEC.name), connection=redis).get_job_ids() == ["fresh"]
    error = JobRecord.from_hash(redis.hgetall(record_key("old"))).error  # type: ignore[arg-type]
    assert error is not None and error.code == "no_worker" and "start a worker serving it" in error.message
    assert redis.lrange("dit:ended:old", 0, -1) == [b"1"]  # waiters wake


def test_the_clock_starts_when_the_last_worker_went_away(redis: Redis) -> None:
    _enqueue(redis, "a", age_s=ORPHAN_S * 2)
    redis.hset(SERVED_UNTIL_KEY, SPEC.name, time.time() - ORPHAN_S / 2)  # its worker left recently
    reap_lost_jobs(redis, ORPHAN_S, TTL_S)
    assert _status(redis, "a") == "queued"
    redis.hset(SERVED_UNTIL_KEY, SPEC.name, time.time() - ORPHAN_S - 1)
    redis.delete("dit:reaper-lock")
    reap_lost_jobs(redis, ORPHAN_S, TTL_S)
    assert _status(redis, "a") == "failed"
    assert redis.hget(record_key("a"), RecordField.COMPLETED_AT) is not None


@pytest.mark.slow
def test_a_job_accepted_as_its_only_worker_dies_fails_no_worker(
    redis_url: str, model_dirs: dict[str, Path], tmp_path: Path
) -> None:
    """kill -9 the only worker and submit while its registration lingers: within the heartbeat TTL
    /readyz turns 503 and /v1/models empties, and the job fails no_worker after the orphan timeout."""
    Redis.from_url(redis_url).flushdb()
    env = {
        "DIT_HEARTBEAT_TTL_S": str(HEARTBEAT_TTL_S),
        "DIT_HEARTBEAT_INTERVAL_S": "0.5",
        "DIT_REAP_INTERVAL_S": "0.5",
        "DIT_ORPHAN_TIMEOUT_S": "2",
    }
    svc = Service(redis_url, tmp_path, {"img": model_dirs["img"]}, env)
    try:
        svc.start_api()
        worker = svc.start_worker()
        os.kill(worker.pid, signal.SIGKILL)
        killed_at = time.monotonic()
        with svc.client() as client:
            response = client.post("/v1/images", json={"prompt": "red circle"})
            assert response.status_code == 202, response.text  # the dead worker's registration lingers
            while client.get("/readyz").status_code == 200:
                assert time.monotonic() - killed_at < HEARTBEAT_TTL_S + 1, (
                    "a dead worker still counts as live"
                )
                time.sleep(0.1)
            assert client.get("/readyz").json()["error"]["code"] == "no_worker"
            assert client.get("/v1/models").json()["data"] == []
            job = wait_for_status(client, response.json()["id"], {"failed", "completed"}, timeout_s=30)
        assert job["status"] == "failed" and job["error"]["code"] == "no_worker"
        assert "dit-serve worker --model img=SOURCE" in job["error"]["message"]
    finally:
        svc.stop()
        Redis.from_url(redis_url).flushdb()
