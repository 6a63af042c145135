"""Admission control: a per-model queue cap refused at the door with 429 queue_full and Retry-After."""

import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest
from redis import Redis
from rq import Queue
from rq.registry import FinishedJobRegistry

from dit_serve.jobs import JobRecord, queue_name, record_key
from dit_serve.queueing import QueueFullError, enqueue_job
from tests.conftest import api_without_workers
from tests.test_contract import SPEC, _request

QUEUE = queue_name(SPEC.name)
TTL_S = 3600
CAP = 3


def _try_enqueue(redis: Redis, job_id: str, cap: int) -> bool:
    try:
        enqueue_job(redis, job_id, JobRecord.new(_request()), retries=0, ttl_s=TTL_S, max_depth=cap)
    except QueueFullError:
        return False
    return True


def test_the_cap_holds_and_a_refused_job_leaves_nothing(redis: Redis) -> None:
    assert [_try_enqueue(redis, f"j{i}", CAP) for i in range(CAP + 1)] == [True] * CAP + [False]
    assert Queue(QUEUE, connection=redis).get_job_ids() == ["j0", "j1", "j2"]
    assert not redis.exists(record_key(f"j{CAP}"), f"rq:job:j{CAP}")  # taken back entirely


def test_concurrent_submissions_never_exceed_the_cap(redis_url: str, redis: Redis) -> None:
    def submit(i: int) -> bool:
        return _try_enqueue(Redis.from_url(redis_url), f"r{i}", 5)

    with ThreadPoolExecutor(10) as pool:
        accepted = list(pool.map(submit, range(20)))
    assert sum(accepted) == 5 and len(Queue(QUEUE, connection=redis).get_job_ids()) == 5


@pytest.mark.slow
def test_a_full_queue_is_a_429_with_retry_after_from_the_drain_rate(redis_url: str, tmp_path: Path) -> None:
    with api_without_workers(redis_url, tmp_path, SPEC, DIT_MAX_QUEUE_DEPTH=str(CAP)) as svc:
        redis = Redis.from_url(redis_url)
        post = lambda **headers: httpx.post(  # noqa: E731
            f"{svc.base_url}/v1/images", json={"prompt": "red circle"}, headers=headers, timeout=30
        )
        accepted = [post() for _ in range(CAP)]
        assert [response.status_code for response in accepted] == [202] * CAP
        full = post()
        assert full.status_code == 429 and full.json()["error"]["code"] == "queue_full"
        assert full.headers["Retry-After"] == "5"  # nothing finished lately: the fallback
        assert len(Queue(QUEUE, connection=redis).get_job_ids()) == CAP
        # 30 jobs finished in the last minute: one slot frees every 2 s.
        finished = FinishedJobRegistry(QUEUE, connection=redis).key
        redis.zadd(finished, {f"done{i}": time.time() + TTL_S * 24 * 7 - i for i in range(30)})
        assert post().headers["Retry-After"] == "2"
        # A refused request's Idempotency-Key is not spent: after a cancel it creates the job.
        assert post(**{"Idempotency-Key": "k"}).status_code == 429
        httpx.delete(f"{svc.base_url}/v1/jobs/{accepted[0].json()['id']}", timeout=30)
        assert post(**{"Idempotency-Key": "k"}).status_code == 202
        metrics = httpx.get(f"{svc.base_url}/metrics", timeout=30).text
        assert 'dit_jobs_rejected_total{kind="image",reason="queue_full"} 3.0' in metrics
