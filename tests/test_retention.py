"""Retention against a real Redis and real files: every way a job ends schedules it, and the sweep
deletes outputs and records, leaves a marker for the owner, never touches a live job, and runs safely
in many sweepers at once. The whole service, with S3, is in tests/test_retention_service.py."""

import threading
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from redis import Redis
from rq.registry import FinishedJobRegistry

from app.auth import Caller
from app.errors import Gone, NotFound
from app.views import read_record
from dit_serve.events import events_key
from dit_serve.job_index import ALL_JOBS_KEY, owner_index_key
from dit_serve.jobs import JobError, JobRecord, OutputRecord, ended_key, queue_name, record_key, rq_job_key
from dit_serve.queueing import cancel_job, enqueue_job, fail_queued_job, reap_lost_jobs
from dit_serve.retention import (
    RETENTION_KEY,
    SWEEP_LEASE_S,
    expired_key,
    parse_expired,
    record_ttl_s,
    sweep_expired_jobs,
)
from dit_serve.storage import LocalStorage, output_key
from tests.test_contract import _request as contract_request
from worker.queue import JobQueue

MODEL = "m"
QUEUE = queue_name(MODEL)
TTL_S = 3600
GRACE_S = 600
ALICE, BOB = Caller(name="alice", admin=False), Caller(name="bob", admin=False)
ADMIN = Caller(name="ops", admin=True)
CLOCK_SLACK_S = 30  # between a job's end in a test and the test's own reading of the clock


def _enqueue(redis: Redis, job_id: str, n: int = 1, retries: int = 2, owner: str | None = "alice") -> None:
    request = contract_request(model=MODEL, n=n, class_labels=[0] * n)
    enqueue_job(redis, job_id, JobRecord.new(request, owner=owner), retries=retries, ttl_s=TTL_S)


def _jobs(redis: Redis, heartbeat_ttl_s: int = 30) -> JobQueue:
    return JobQueue(redis, [QUEUE], "w1", heartbeat_ttl_s, TTL_S)


def _complete(redis: Redis, storage: LocalStorage, job_id: str, n: int = 2, owner: str = "alice") -> None:
    """A job run to its end by a worker: n outputs stored, then settled completed."""
    _enqueue(redis, job_id, n=n, owner=owner)
    [ticket] = _jobs(redis).take(QUEUE, 16, f"exec-{job_id}")
    outputs = []
    for index in range(n):
        key = output_key(job_id, index, "png")
        storage.put(key, b"png bytes", "image/png")
        outputs.append(
            OutputRecord(index=index, content_type="image/png", width=32, height=32, seed=1, bytes=9, key=key)
        )
    assert _jobs(redis).complete(ticket, outputs)


def _expiry(redis: Redis, job_id: str) -> float | None:
    score = redis.zscore(RETENTION_KEY, job_id)
    return float(score) if score is not None else None  # type: ignore[arg-type]


def _later() -> float:
    """A time at which every job ended by the test so far is due."""
    return time.time() + TTL_S + CLOCK_SLACK_S


def test_every_way_a_job_ends_schedules_it_and_gives_its_records_the_safety_net(redis: Redis) -> None:
    storage = LocalStorage(Path("/nonexistent"))  # nothing is stored here
    jobs = _jobs(redis)
    settles = {
        "completed": lambda ticket: jobs.complete(ticket, []),
        "failed": lambda ticket: jobs.fail(ticket, JobError(code="sampling_failed", message="m")),
        "canceled-running": jobs.cancel,
    }
    for job_id, settle in settles.items():
        _enqueue(redis, job_id)
        [ticket] = jobs.take(QUEUE, 1, f"e-{job_id}")
        assert settle(ticket)
    _enqueue(redis, "canceled-queued")
    assert cancel_job(redis, "canceled-queued", MODEL, TTL_S) == "canceled"
    _enqueue(redis, "timed-out")
    assert fail_queued_job(redis, QUEUE, "timed-out", JobError(code="queue_timeout", message="m"), TTL_S)
    # A running job flagged for cancel whose worker dies is requeued flagged; the take cancels it.
    _enqueue(redis, "canceled-at-take")
    _jobs(redis, heartbeat_ttl_s=-1).take(QUEUE, 1, "dead")
    assert cancel_job(redis, "canceled-at-take", MODEL, TTL_S) == "cancel_requested"
    reap_lost_jobs(redis, ttl_s=TTL_S)
    assert jobs.take(QUEUE, 1, "e-take") == []
    _enqueue(redis, "worker-lost", retries=0)
    _jobs(redis, heartbeat_ttl_s=-1).take(QUEUE, 1, "dead-again")
    time.sleep(1.1)  # the reaper runs at most once a second (REAPER_LOCK_MS)
    reap_lost_jobs(redis, ttl_s=TTL_S)
    _enqueue(redis, "running")
    jobs.take(QUEUE, 1, "e-running")
    _enqueue(redis, "queued")

    ended = ["completed", "failed", "canceled-running", "canceled-queued", "timed-out"]
    ended += ["canceled-at-take", "worker-lost"]
    statuses = {job_id: redis.hget(rq_job_key(job_id), "status") for job_id in ended}
    assert set(statuses.values()) == {b"finished", b"failed", b"canceled"}, statuses
    now = time.time()
    for job_id in ended:
        expiry = _expiry(redis, job_id)
        assert expiry is not None and now + TTL_S - CLOCK_SLACK_S < expiry <= now + TTL_S, job_id
        for key in (record_key(job_id), rq_job_key(job_id)):
            assert TTL_S < redis.ttl(key) <= record_ttl_s(TTL_S), (job_id, key)  # type: ignore[operator]
    assert _expiry(redis, "queued") is None and _expiry(redis, "running") is None
    assert sorted(sweep_expired_jobs(redis, storage, grace_s=GRACE_S, now=now)) == []  # none due yet
    assert sorted(sweep_expired_jobs(redis, storage, grace_s=GRACE_S, now=_later())) == sorted(ended)


def test_the_sweep_deletes_outputs_and_records_and_leaves_the_owner_a_marker(
    redis: Redis, tmp_path: Path
) -> None:
    storage = LocalStorage(tmp_path)
    _complete(redis, storage, "old", n=2)
    redis.xadd(events_key("old"), {"type": "progress", "data": "{}"})  # its live events
    _complete(redis, storage, "other", n=1, owner="bob")
    redis.zadd(RETENTION_KEY, {"other": time.time() + 2 * TTL_S})  # it ended later
    assert read_record(redis, "old", ALICE)[0].outputs[1].key == "jobs/old/1.png"
    assert sweep_expired_jobs(redis, storage, grace_s=GRACE_S, now=time.time() + TTL_S - CLOCK_SLACK_S) == []

    assert sweep_expired_jobs(redis, storage, grace_s=GRACE_S, now=_later()) == ["old"]
    assert not (tmp_path / "jobs" / "old").exists()
    assert storage.exists("jobs/other/0.png")  # not due: untouched
    # Every key of the job (its event stream too) is gone but its marker, and its id is in no set any more.
    assert [key.decode() for key in redis.keys("*old*")] == [expired_key("old")]
    for key in (ALL_JOBS_KEY, owner_index_key("alice"), FinishedJobRegistry(QUEUE, connection=redis).key):
        assert redis.zscore(key, "old") is None, key
    assert redis.zscore(RETENTION_KEY, "old") is None
    marker = parse_expired(redis.hgetall(expired_key("old")))  # type: ignore[arg-type]
    assert marker is not None and marker.owner == "alice"
    assert GRACE_S - CLOCK_SLACK_S < redis.ttl(expired_key("old")) <= GRACE_S  # type: ignore[operator]
    # The owner and admins are told it expired; another key cannot tell it from an unknown id.
    for caller in (ALICE, ADMIN, None):
        with pytest.raises(Gone) as gone:
            read_record(redis, "old", caller)
        assert gone.value.status == 410 and gone.value.code == "job_expired"
    for job_id in ("old", "never-was"):
        with pytest.raises(NotFound) as missing:
            read_record(redis, job_id, BOB)
        assert missing.value.code == "job_not_found"
    redis.delete(expired_key("old"))  # what Redis does when the grace period ends
    with pytest.raises(NotFound):
        read_record(redis, "old", ALICE)


def test_queued_and_running_jobs_are_never_swept(redis: Redis, tmp_path: Path) -> None:
    storage = LocalStorage(tmp_path)
    _enqueue(redis, "running")
    _jobs(redis).take(QUEUE, 1, "e")
    _enqueue(redis, "queued")
    storage.put(output_key("running", 0, "png"), b"png bytes", "image/png")
    assert sweep_expired_jobs(redis, storage, grace_s=GRACE_S, now=_later()) == []
    # Even with an entry (as when an operator requeues a failed job with `rq requeue`), a live job
    # keeps everything, and loses the entry.
    redis.zadd(RETENTION_KEY, {"queued": 0, "running": 0})
    assert sweep_expired_jobs(redis, storage, grace_s=GRACE_S, now=_later()) == []
    assert redis.zcard(RETENTION_KEY) == 0
    assert read_record(redis, "queued", ALICE)[1] == "queued"
    assert read_record(redis, "running", ALICE)[1] == "in_progress"
    assert storage.exists(output_key("running", 0, "png"))


def test_canceled_and_failed_jobs_without_outputs_are_swept(redis: Redis, tmp_path: Path) -> None:
    storage = LocalStorage(tmp_path)
    _enqueue(redis, "canceled")
    cancel_job(redis, "canceled", MODEL, TTL_S)
    _enqueue(redis, "failed")
    fail_queued_job(redis, QUEUE, "failed", JobError(code="no_worker", message="m"), TTL_S)
    # A failed job may have left some outputs behind (storage_failed after the first of two).
    storage.put(output_key("failed", 0, "png"), b"png bytes", "image/png")
    assert sorted(sweep_expired_jobs(redis, storage, grace_s=GRACE_S, now=_later())) == ["canceled", "failed"]
    assert not (tmp_path / "jobs" / "failed").exists()
    for job_id in ("canceled", "failed"):
        with pytest.raises(Gone):
            read_record(redis, job_id, ALICE)
        assert redis.exists(record_key(job_id), rq_job_key(job_id), ended_key(job_id)) == 0


class CountingStorage(LocalStorage):
    """Local storage that counts each prefix deletion, and can fail the first ones."""

    def __init__(self, root: Path, failures: int = 0) -> None:
        super().__init__(root)
        self.deleted: Counter[str] = Counter()
        self.failures = failures
        self._lock = threading.Lock()

    def delete_prefix(self, prefix: str) -> None:
        with self._lock:
            if self.failures:
                self.failures -= 1
                raise OSError("the store is down")
            self.deleted[prefix] += 1
        time.sleep(0.001)  # let other sweepers interleave
        super().delete_prefix(prefix)


def test_several_sweepers_at_once_delete_each_job_once(redis: Redis, redis_url: str, tmp_path: Path) -> None:
    storage = CountingStorage(tmp_path)
    job_ids = [f"job{index:03d}" for index in range(120)]
    for job_id in job_ids:
        _complete(redis, storage, job_id, n=1)
    now = _later()

    def sweeper(_: int) -> list[str]:
        client = Redis.from_url(redis_url)
        swept: list[str] = []
        while batch := sweep_expired_jobs(client, storage, grace_s=GRACE_S, now=now, batch=7):
            swept += batch
        client.close()
        return swept

    with ThreadPoolExecutor(max_workers=8) as pool:
        results = list(pool.map(sweeper, range(8)))  # re-raises any sweeper's exception
    swept = [job_id for result in results for job_id in result]
    assert sorted(swept) == job_ids  # each job swept by exactly one sweeper
    assert sum(1 for result in results if result) > 1  # ... and the work was shared
    assert storage.deleted == Counter({f"jobs/{job_id}/": 1 for job_id in job_ids})
    assert list((tmp_path / "jobs").iterdir()) == []
    assert redis.zcard(RETENTION_KEY) == 0


def test_outputs_that_cannot_be_deleted_are_swept_again_once_the_claim_lapses(
    redis: Redis, tmp_path: Path
) -> None:
    storage = CountingStorage(tmp_path, failures=1)
    _complete(redis, storage, "stuck", n=1)
    now = _later()
    assert sweep_expired_jobs(redis, storage, grace_s=GRACE_S, now=now) == []
    with pytest.raises(Gone):  # the records went first: clients are told at once
        read_record(redis, "stuck", ALICE)
    assert storage.exists(output_key("stuck", 0, "png"))
    assert sweep_expired_jobs(redis, storage, grace_s=GRACE_S, now=now + 1) == []  # still claimed
    assert sweep_expired_jobs(redis, storage, grace_s=GRACE_S, now=now + SWEEP_LEASE_S + 1) == ["stuck"]
    assert not storage.exists(output_key("stuck", 0, "png"))
    with pytest.raises(Gone):  # the marker outlives the retry
        read_record(redis, "stuck", ALICE)


def test_without_delete_outputs_only_records_are_swept_and_grace_zero_is_a_404_at_once(
    redis: Redis, tmp_path: Path
) -> None:
    storage = LocalStorage(tmp_path)
    _complete(redis, storage, "kept", n=1)
    swept = sweep_expired_jobs(redis, storage, grace_s=0, delete_outputs=False, now=_later())
    assert swept == ["kept"]
    assert storage.exists(output_key("kept", 0, "png"))  # left to the bucket's lifecycle rule
    assert redis.keys("*kept*") == []
    with pytest.raises(NotFound):
        read_record(redis, "kept", ALICE)
