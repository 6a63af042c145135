"""The Lua queue operations against a real Redis: take, settle, cancel, reap."""

import time

from redis import Redis
from rq import Queue
from rq.registry import StartedJobRegistry

from dit_serve.contract import JobRequest
from dit_serve.events import ProgressEvent
from dit_serve.jobs import JobError, JobRecord, OutputRecord, queue_name, record_key
from dit_serve.queueing import cancel_job, enqueue_job, reap_lost_jobs
from tests.test_contract import _request as contract_request
from worker.queue import JobQueue

MODEL = "m"
QUEUE = queue_name(MODEL)
TTL_S = 3600


def _enqueue(redis: Redis, job_id: str, steps: int = 25, n: int = 1, retries: int = 2) -> None:
    enqueue_job(redis, job_id, JobRecord.new(_request(steps, n)), retries=retries, ttl_s=TTL_S)


def _request(steps: int = 25, n: int = 1) -> JobRequest:
    return contract_request(model=MODEL, n=n, class_labels=[0] * n, num_inference_steps=steps)


def _status(redis: Redis, job_id: str) -> str:
    return redis.hget(f"rq:job:{job_id}", "status").decode()


def _queue(redis: Redis, heartbeat_ttl_s: int = 30) -> JobQueue:
    return JobQueue(redis, [QUEUE], "w1", heartbeat_ttl_s, TTL_S)


def test_take_groups_compatible_jobs_up_to_max_samples(redis: Redis) -> None:
    _enqueue(redis, "a", n=2)
    _enqueue(redis, "b", steps=10)  # incompatible with a: stays queued
    _enqueue(redis, "c", n=3)
    _enqueue(redis, "d", n=2)
    taken = _queue(redis).take(QUEUE, 5, "exec1")
    assert [ticket.job_id for ticket in taken] == ["a", "c"]  # d would make 7 > 5 outputs
    assert Queue(QUEUE, connection=redis).get_job_ids() == ["b", "d"]
    assert _status(redis, "a") == "started" and _status(redis, "b") == "queued"
    assert sorted(StartedJobRegistry(QUEUE, connection=redis).get_job_ids(cleanup=False)) == ["a", "c"]
    assert redis.hget(record_key("a"), "execution") == b"exec1"


def test_a_job_larger_than_the_batch_is_still_taken_alone(redis: Redis) -> None:
    _enqueue(redis, "big", n=8)
    assert [ticket.job_id for ticket in _queue(redis).take(QUEUE, 4, "e")] == ["big"]


def test_take_with_compat_only_takes_matching_jobs(redis: Redis) -> None:
    _enqueue(redis, "a", steps=10)
    compat = _request(steps=25).compat
    assert _queue(redis).take(QUEUE, 16, "e", compat) == []


def test_stale_queue_entries_are_dropped(redis: Redis) -> None:
    _enqueue(redis, "a")
    queue = Queue(QUEUE, connection=redis)
    queue.push_job_id("a")  # a duplicate entry, as two racing requeues could leave
    queue.push_job_id("ghost")  # an entry whose job no longer exists
    assert [ticket.job_id for ticket in _queue(redis).take(QUEUE, 16, "e")] == ["a"]
    assert queue.get_job_ids() == ["ghost"]  # the take reads scheduled jobs only
    reap_lost_jobs(redis)  # the reaper drops list entries of jobs that are not queued
    assert queue.get_job_ids() == []


def test_cancel_queued_then_running(redis: Redis) -> None:
    _enqueue(redis, "a")
    _enqueue(redis, "b")
    assert cancel_job(redis, "b", MODEL, TTL_S) == "canceled"
    assert _status(redis, "b") == "canceled" and Queue(QUEUE, connection=redis).get_job_ids() == ["a"]
    jobs = _queue(redis)
    [ticket] = jobs.take(QUEUE, 16, "e")
    assert cancel_job(redis, "a", MODEL, TTL_S) == "cancel_requested"
    assert jobs.report_progress([ProgressEvent(id="a", step=4, steps=10, percent=38)]) == {"a"}
    assert jobs.cancel(ticket)
    assert _status(redis, "a") == "canceled"
    assert cancel_job(redis, "a", MODEL, TTL_S) == "canceled"  # already ended: the caller answers 409
    assert cancel_job(redis, "nope", MODEL, TTL_S) == "missing"


def test_a_reaped_job_is_requeued_and_its_old_holder_cannot_settle_it(redis: Redis) -> None:
    _enqueue(redis, "a")
    old = _queue(redis, heartbeat_ttl_s=-1)  # deadline already in the past: a dead worker
    [stale] = old.take(QUEUE, 16, "old-exec")
    reap_lost_jobs(redis)
    assert _status(redis, "a") == "queued" and Queue(QUEUE, connection=redis).get_job_ids() == ["a"]
    assert not old.complete(stale, [])  # the old run's late result is ignored
    new = _queue(redis)
    [fresh] = new.take(QUEUE, 16, "new-exec")
    assert not old.fail(stale, JobError(code="x", message="y"))
    output = OutputRecord(index=0, content_type="image/png", width=32, height=32, seed=1, bytes=9, key="k")
    assert new.complete(fresh, [output])
    assert _status(redis, "a") == "finished"
    assert redis.hget(record_key("a"), "attempts") == b"2"


def test_out_of_retries_a_reaped_job_fails(redis: Redis) -> None:
    _enqueue(redis, "a", retries=0)
    _queue(redis, heartbeat_ttl_s=-1).take(QUEUE, 16, "e")
    reap_lost_jobs(redis)
    assert _status(redis, "a") == "failed"


def test_heartbeat_keeps_held_jobs_alive(redis: Redis) -> None:
    _enqueue(redis, "a")
    jobs = _queue(redis, heartbeat_ttl_s=1)
    taken = jobs.take(QUEUE, 16, "e")
    time.sleep(1.1)
    jobs.heartbeat_ttl_s = 30
    jobs.heartbeat(taken)  # a live worker pushes the deadline forward before the reaper looks
    reap_lost_jobs(redis)
    assert _status(redis, "a") == "started"
