"""The reaping policy against a real Redis (dit_serve/reaping.py): a worker's death costs a retry only
to a job that ran alone, a job held by two dead workers is taken only alone, and a hung batch's jobs
are given back. Workers die here by their heartbeat deadline being put in the past."""

from redis import Redis
from rq import Queue
from rq.registry import FailedJobRegistry, StartedJobRegistry

from dit_serve.contract import Priority
from dit_serve.jobs import TIMEOUT_ERROR, WORKER_LOST, JobRecord, queue_name, record_key, rq_job_key
from dit_serve.queueing import enqueue_job, reap_lost_jobs
from dit_serve.reaping import (
    REAPED_FAILED,
    REAPED_KEY,
    REAPED_REQUEUED,
    REAPED_TIMED_OUT,
    SOLO_AFTER_DEATHS,
    HeldRole,
)
from dit_serve.scheduling import class_key
from tests.test_contract import _request as contract_request
from worker.batching import JobTicket
from worker.queue import JobQueue

MODEL = "m"
QUEUE = queue_name(MODEL)
TTL_S = 3600
RETRIES = 2


def _enqueue(redis: Redis, *job_ids: str, retries: int = RETRIES) -> None:
    for job_id in job_ids:
        request = contract_request(model=MODEL)
        enqueue_job(redis, job_id, JobRecord.new(request), retries=retries, ttl_s=TTL_S)


def _worker(redis: Redis) -> JobQueue:
    return JobQueue(redis, [QUEUE], "w", heartbeat_ttl_s=30, ttl_s=TTL_S)


def _take(redis: Redis, execution: str = "e", joining: bool = False) -> list[JobTicket]:
    return _worker(redis).take(QUEUE, 16, execution, joining=joining)


def _die(redis: Redis) -> None:
    """Every held job's heartbeat deadline is long past, as when its worker died; the reaper runs."""
    started = StartedJobRegistry(QUEUE, connection=redis).key
    redis.zadd(started, dict.fromkeys(redis.zrange(started, 0, -1), 0))
    redis.delete("dit:reaper-lock")
    reap_lost_jobs(redis, ttl_s=TTL_S)


def _field(redis: Redis, key: str, field: str) -> str | None:
    value = redis.hget(key, field)
    return value.decode() if value is not None else None  # type: ignore[union-attr]


def _status(redis: Redis, job_id: str) -> str | None:
    return _field(redis, rq_job_key(job_id), "status")


def _record(redis: Redis, job_id: str) -> JobRecord:
    return JobRecord.from_hash(redis.hgetall(record_key(job_id)))  # type: ignore[arg-type]


def _reaped(redis: Redis, outcome: str) -> int:
    return int(redis.hget(REAPED_KEY, f"{MODEL}|{outcome}") or 0)  # type: ignore[arg-type]


def test_a_death_in_a_shared_batch_costs_no_retry_and_two_make_a_job_solo(redis: Redis) -> None:
    _enqueue(redis, "a", "b", "c")
    assert len(_take(redis)) == 3
    _die(redis)
    assert [_status(redis, job_id) for job_id in "abc"] == ["queued"] * 3
    assert [_field(redis, rq_job_key(job_id), "retries_left") for job_id in "abc"] == [str(RETRIES)] * 3
    assert [_record(redis, job_id).deaths for job_id in "abc"] == [1, 1, 1]
    assert not any(_record(redis, job_id).solo for job_id in "abc")
    assert _reaped(redis, REAPED_REQUEUED) == 3
    # back in the scheduler's sets (reconcile), and in RQ's list, so `rq info` counts them
    assert all(redis.zscore(class_key(QUEUE, Priority.NORMAL), job_id) is not None for job_id in "abc")
    assert sorted(Queue(QUEUE, connection=redis).get_job_ids()) == ["a", "b", "c"]
    assert StartedJobRegistry(QUEUE, connection=redis).get_job_ids(cleanup=False) == []

    assert len(_take(redis, "e2")) == 3  # batched together again: it killed its worker again
    _die(redis)
    assert SOLO_AFTER_DEATHS == 2
    assert [(_record(redis, job_id).deaths, _record(redis, job_id).solo) for job_id in "abc"] == [
        (2, True)
    ] * 3
    assert [_field(redis, rq_job_key(job_id), "retries_left") for job_id in "abc"] == [str(RETRIES)] * 3


def test_a_solo_job_is_taken_only_alone_and_never_joins_a_batch(redis: Redis) -> None:
    _enqueue(redis, "first", "solo", "last")
    redis.hset(record_key("solo"), "solo", "1")
    # a batch that has jobs already never takes it, and says that it waits
    worker = _worker(redis)
    assert [ticket.job_id for ticket in worker.take(QUEUE, 16, "e", joining=True)] == ["first", "last"]
    assert worker.solo_waiting(QUEUE)
    # a new batch starts with it, and takes nothing more
    _enqueue(redis, "after")
    [ticket] = worker.take(QUEUE, 16, "e2")
    assert (ticket.job_id, ticket.solo) == ("solo", True)
    assert Queue(QUEUE, connection=redis).get_job_ids() == ["after"]
    assert _field(redis, record_key("solo"), "batch_jobs") == "1"
    # nor is it added to a batch already begun in the same take
    _enqueue(redis, "x", "solo2")
    redis.hset(record_key("solo2"), "solo", "1")
    assert [ticket.job_id for ticket in worker.take(QUEUE, 16, "e3")] == ["after", "x"]
    assert worker.take(QUEUE, 16, "e4", joining=True) == [] and worker.solo_waiting(QUEUE)


def test_a_solo_job_that_dies_fails_worker_lost_and_its_neighbours_kept_their_retries(redis: Redis) -> None:
    _enqueue(redis, "poison", "a")
    for execution in ("e1", "e2"):
        _take(redis, execution)
        _die(redis)
    _take(redis, "e3")  # one solo job
    [alone] = StartedJobRegistry(QUEUE, connection=redis).get_job_ids(cleanup=False)
    _die(redis)
    assert _status(redis, alone) == "failed"
    record = _record(redis, alone)
    assert record.error == WORKER_LOST and record.deaths == 3 and record.completed_at is not None
    assert redis.lrange(f"dit:ended:{alone}", 0, -1) == [b"1"]  # a waiting client wakes
    assert FailedJobRegistry(QUEUE, connection=redis).get_job_ids(cleanup=False) == [alone]
    assert _reaped(redis, REAPED_FAILED) == 1 and _reaped(redis, REAPED_REQUEUED) == 4
    other = "a" if alone == "poison" else "poison"
    assert _status(redis, other) == "queued"
    assert _field(redis, rq_job_key(other), "retries_left") == str(RETRIES)


def test_a_death_while_alone_spends_a_retry_until_none_is_left(redis: Redis) -> None:
    _enqueue(redis, "a", retries=1)
    _take(redis)
    _die(redis)
    assert _status(redis, "a") == "queued" and _field(redis, rq_job_key("a"), "retries_left") == "0"
    _take(redis, "e2")
    _die(redis)
    assert _status(redis, "a") == "failed" and _record(redis, "a").error == WORKER_LOST


def test_a_job_waiting_for_its_turn_is_not_to_blame(redis: Redis) -> None:
    _enqueue(redis, "running", "waiting", retries=0)
    worker = _worker(redis)
    held = worker.take(QUEUE, 16, "e")
    worker.mark_running(held, {"running": 1})  # sampled alone while the other waited its turn
    _die(redis)
    assert _status(redis, "running") == "failed"  # no retries, and it ran alone
    assert _status(redis, "waiting") == "queued" and _record(redis, "waiting").deaths == 1


def test_a_stale_entry_of_an_earlier_execution_is_dropped(redis: Redis) -> None:
    _enqueue(redis, "a")
    _take(redis, "now")
    started = StartedJobRegistry(QUEUE, connection=redis).key
    redis.zadd(started, {"a:before": 0})  # an entry left over from an earlier run of the job
    reap_lost_jobs(redis, ttl_s=TTL_S)
    assert _status(redis, "a") == "started" and _record(redis, "a").deaths == 0
    assert redis.zrange(started, 0, -1) == [b"a:now"]


def test_a_hung_batch_gives_its_jobs_back(redis: Redis) -> None:
    _enqueue(redis, "alone", "shared", "waiting", "solo")
    worker = _worker(redis)
    held = worker.take(QUEUE, 16, "e")
    roles = {"alone": HeldRole.ALONE, "shared": HeldRole.SHARED, "solo": HeldRole.ALONE}
    outcomes = dict(worker.give_up(held, roles))
    assert outcomes == {
        "alone": REAPED_TIMED_OUT,
        "shared": REAPED_REQUEUED,
        "waiting": REAPED_REQUEUED,
        "solo": REAPED_TIMED_OUT,
    }
    assert _record(redis, "alone").error == TIMEOUT_ERROR and _status(redis, "alone") == "failed"
    assert _record(redis, "shared").solo and not _record(redis, "waiting").solo  # shared runs alone next
    assert {_status(redis, job_id) for job_id in ("shared", "waiting")} == {"queued"}
    assert StartedJobRegistry(QUEUE, connection=redis).get_job_ids(cleanup=False) == []
    assert _reaped(redis, REAPED_TIMED_OUT) == 2 and _reaped(redis, REAPED_REQUEUED) == 2
    # requeued jobs are scheduled at once (the worker then exits), the shared one alone next time
    assert [ticket.job_id for ticket in worker.take(QUEUE, 16, "e2")] in (["shared"], ["waiting"])
    assert worker.give_up(held, roles) == []  # held by another execution now, or not started: untouched
