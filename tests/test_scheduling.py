"""The scheduler against a real Redis: priority classes, aging, fair share across keys, and per-key
admission limits (token bucket, live-job quota)."""

import time

import pytest
from redis import Redis
from rq import Queue
from rq.registry import StartedJobRegistry

from dit_serve.admission import QuotaExceeded, RateLimited, hold_slot, take_token
from dit_serve.contract import Priority
from dit_serve.jobs import JobRecord, queue_name, record_key
from dit_serve.queueing import (
    cancel_job,
    enqueue_job,
    queue_position,
    reap_lost_jobs,
)
from dit_serve.reaping import REAPED_KEY, REAPED_REQUEUED
from dit_serve.scheduling import class_key, scheduler_keys
from tests.test_contract import _request as contract_request
from worker.queue import JobQueue

MODEL = "m"
QUEUE = queue_name(MODEL)
TTL_S = 3600


def _enqueue(
    redis: Redis,
    job_id: str,
    owner: str | None = "a",
    priority: Priority = Priority.NORMAL,
    n: int = 1,
    aging_s: float = 0,
) -> None:
    request = contract_request(model=MODEL, n=n, class_labels=[0] * n, priority=priority)
    enqueue_job(redis, job_id, JobRecord.new(request, owner=owner), retries=1, ttl_s=TTL_S, aging_s=aging_s)


def _take(redis: Redis, max_samples: int) -> list[str]:
    queue = JobQueue(redis, [QUEUE], "w", heartbeat_ttl_s=30, ttl_s=TTL_S)
    return [ticket.job_id for ticket in queue.take(QUEUE, max_samples, "e")]


def test_a_key_with_one_job_is_served_in_the_next_batch_after_a_flooding_key(redis: Redis) -> None:
    for i in range(64):
        _enqueue(redis, f"a{i}", owner="a")
    _enqueue(redis, "b0", owner="b")
    assert "b0" in _take(redis, 8)
    # Later too: B's next job, sent while A still has 56 queued, goes in the very next batch.
    _enqueue(redis, "b1", owner="b")
    assert "b1" in _take(redis, 8)
    assert len(Queue(QUEUE, connection=redis).get_job_ids()) == 66 - 16  # rq info still counts them


def test_fair_share_is_weighted_by_outputs(redis: Redis) -> None:
    for i in range(8):
        _enqueue(redis, f"big{i}", owner="a", n=4)
        _enqueue(redis, f"one{i}", owner="b", n=1)
    taken = _take(redis, 16)
    # 16 rows shared fairly in outputs: about 8 for each key, not 4 jobs each (16 rows for A).
    rows_a = 4 * sum(job.startswith("big") for job in taken)
    rows_b = sum(job.startswith("one") for job in taken)
    assert rows_a + rows_b <= 16 and abs(rows_a - rows_b) <= 4, taken


def test_without_keys_a_class_is_first_in_first_out(redis: Redis) -> None:
    for i in range(6):
        _enqueue(redis, f"j{i}", owner=None)
    assert _take(redis, 3) == ["j0", "j1", "j2"]
    assert _take(redis, 3) == ["j3", "j4", "j5"]


def test_high_goes_before_normal_and_normal_before_low(redis: Redis) -> None:
    _enqueue(redis, "low", priority=Priority.LOW)
    for i in range(64):
        _enqueue(redis, f"n{i}")
    _enqueue(redis, "high", priority=Priority.HIGH)
    assert queue_position(redis, MODEL, "high") == 0 and queue_position(redis, MODEL, "low") == 65
    assert _take(redis, 4) == ["high", "n0", "n1", "n2"]
    assert queue_position(redis, MODEL, "low") == 61


def test_a_waiting_low_job_is_promoted_to_normal_with_a_fair_turn(redis: Redis) -> None:
    for i in range(32):
        _enqueue(redis, f"n{i}", owner="a")
    _enqueue(redis, "low", owner="b", priority=Priority.LOW, aging_s=0.3)
    assert "low" not in _take(redis, 4)
    time.sleep(0.4)
    assert "low" in _take(redis, 4)  # now normal, with B's turn: ahead of A's 24 remaining jobs


def test_canceled_and_taken_jobs_leave_the_scheduler(redis: Redis) -> None:
    _enqueue(redis, "x")
    _enqueue(redis, "y", priority=Priority.LOW, aging_s=60)
    assert cancel_job(redis, "y", MODEL, TTL_S) == "canceled"
    assert _take(redis, 4) == ["x"]
    assert all(redis.exists(key) == 0 for key in scheduler_keys(QUEUE)[:3] + scheduler_keys(QUEUE)[4:])


def test_a_requeued_job_goes_to_the_front_of_its_class(redis: Redis) -> None:
    _enqueue(redis, "lost")
    assert _take(redis, 1) == ["lost"]
    for i in range(5):
        _enqueue(redis, f"n{i}", owner="b")
    # Its worker stopped heartbeating long ago.
    redis.zadd(StartedJobRegistry(QUEUE, connection=redis).key, {"lost:e": 0})
    reap_lost_jobs(redis)
    assert redis.hget(REAPED_KEY, f"{MODEL}|{REAPED_REQUEUED}") == b"1"  # it had a retry left
    assert redis.zscore(class_key(QUEUE, Priority.NORMAL), "lost") is not None
    assert _take(redis, 1) == ["lost"]


def test_the_token_bucket_allows_a_minutes_burst_then_says_when(redis: Redis) -> None:
    for _ in range(3):
        take_token(redis, "k", rate_per_min=3)
    with pytest.raises(RateLimited) as refused:
        take_token(redis, "k", rate_per_min=3)
    assert 19 < refused.value.retry_after_s <= 20  # one token every 20 s
    take_token(redis, "other", rate_per_min=3)  # buckets are per key


def test_the_quota_counts_live_jobs_and_frees_a_slot_when_one_ends(redis: Redis) -> None:
    for i in range(2):
        request = contract_request(model=MODEL)
        enqueue_job(redis, f"q{i}", JobRecord.new(request, owner="k"), retries=0, ttl_s=TTL_S, max_live=2)
    with pytest.raises(QuotaExceeded) as refused:
        enqueue_job(
            redis,
            "q2",
            JobRecord.new(contract_request(model=MODEL), owner="k"),
            retries=0,
            ttl_s=TTL_S,
            max_live=2,
        )
    assert refused.value.live == 2 and not redis.exists(record_key("q2"))  # nothing of it is left
    assert cancel_job(redis, "q0", MODEL, TTL_S) == "canceled"
    hold_slot(redis, "k", "q3", 2)  # the canceled job no longer counts
    redis.hset(record_key("q3"), "model", MODEL)  # q3 is being queued: it counts as live
    with pytest.raises(QuotaExceeded):
        hold_slot(redis, "k", "q4", 2)
