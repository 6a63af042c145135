"""Queue operations shared by the API and the workers: enqueue, cancel, and reaping lost jobs.

The reaping policy itself (who is requeued, who fails) is dit_serve/reaping.py.

Every state change that must not race a worker is one Lua script, so it is atomic in Redis.
"""

import logging
import time
from typing import Literal

from redis import Redis
from rq import Queue, Retry
from rq.registry import CanceledJobRegistry, FailedJobRegistry, FinishedJobRegistry

from dit_serve.admission import hold_slot
from dit_serve.catalog import served_until
from dit_serve.contract import JobRequest
from dit_serve.job_index import index_job
from dit_serve.jobs import (
    KEY_PREFIX,
    NO_WORKER,
    QUEUE_TIMEOUT,
    TASK_FUNCTION,
    JobError,
    JobRecord,
    RecordField,
    ended_key,
    queue_name,
    record_key,
    rq_job_key,
    rq_timestamp,
    wake_key,
)
from dit_serve.reaping import REAPED_KEY, REAPED_ORPHANED, REAPED_REQUEUED, reap_started
from dit_serve.retention import RETENTION_KEY, record_ttl_s
from dit_serve.scheduling import (
    DEFAULT_AGING_S,
    UNSCHEDULE_LUA,
    promote_at,
    queue_rank,
    reconcile,
    schedule_job,
    scheduler_keys,
)
from dit_serve.webhooks import watch_job

log = logging.getLogger(__name__)

QUEUE_PREFIX = queue_name("")
MAX_WAKE_TOKENS = 64
REAPER_LOCK_KEY = f"{KEY_PREFIX}:reaper-lock"
REAPER_LOCK_MS = 1000  # at most one reaping pass per second across all processes
DEFAULT_TTL_S = 7 * 24 * 3600
DEADLINES_KEY = f"{KEY_PREFIX}:deadlines"  # sorted set: job id -> unix time it must have started by
EXPIRED_BATCH = 500  # jobs past their deadline looked at per reaping pass

# KEYS: rq job, our record, the queue list, the canceled registry, the job's ended list, the retention
# set, then scheduler_keys(queue). ARGV: job id, RQ timestamp string, expiry (the registry's and the
# retention set's score), unix now, the records' TTL (dit_serve/retention.py).
_CANCEL_SCRIPT = (
    UNSCHEDULE_LUA
    + """
local status = redis.call('HGET', KEYS[1], 'status')
if not status then return 'missing' end
if status == 'queued' or status == 'scheduled' or status == 'deferred' or status == 'created' then
  redis.call('LREM', KEYS[3], 0, ARGV[1])
  unschedule(6, ARGV[1])
  redis.call('HSET', KEYS[1], 'status', 'canceled', 'ended_at', ARGV[2])
  redis.call('ZADD', KEYS[4], ARGV[3], ARGV[1])
  redis.call('ZADD', KEYS[6], ARGV[3], ARGV[1])
  redis.call('HSET', KEYS[2], 'completed_at', ARGV[4])
  redis.call('EXPIRE', KEYS[1], ARGV[5])
  redis.call('EXPIRE', KEYS[2], ARGV[5])
  redis.call('RPUSH', KEYS[5], '1')
  redis.call('EXPIRE', KEYS[5], ARGV[5])
  return 'canceled'
elseif status == 'started' then
  redis.call('HSET', KEYS[2], 'cancel', '1')
  return 'cancel_requested'
end
return status
"""
)

# Fail a job that is still queued (and only then), as no worker will ever take it.
# KEYS: rq job, our record, the queue list, the failed registry, the job's ended list, the retention
# set, then scheduler_keys(queue). ARGV: job id, RQ timestamp string, expiry (the registry's and the
# retention set's score), unix now, the records' TTL, error JSON.
_FAIL_QUEUED_SCRIPT = (
    UNSCHEDULE_LUA
    + """
if redis.call('HGET', KEYS[1], 'status') ~= 'queued' then return 0 end
redis.call('LREM', KEYS[3], 0, ARGV[1])
unschedule(6, ARGV[1])
redis.call('HSET', KEYS[1], 'status', 'failed', 'ended_at', ARGV[2])
redis.call('ZADD', KEYS[4], ARGV[3], ARGV[1])
redis.call('ZADD', KEYS[6], ARGV[3], ARGV[1])
redis.call('HSET', KEYS[2], 'completed_at', ARGV[4], 'error', ARGV[6])
redis.call('EXPIRE', KEYS[1], ARGV[5])
redis.call('EXPIRE', KEYS[2], ARGV[5])
redis.call('RPUSH', KEYS[5], '1')
redis.call('EXPIRE', KEYS[5], ARGV[5])
return 1
"""
)
# Keep a just-queued job only if it is within the first max_depth of its queue (or already taken).
# KEYS: the queue list, rq job, our record. ARGV: job id, max depth. Returns 1 kept, 0 taken back.
_KEEP_WITHIN_DEPTH_SCRIPT = """
local position = redis.call('LPOS', KEYS[1], ARGV[1])
if not position or position < tonumber(ARGV[2]) then return 1 end
if redis.call('HGET', KEYS[2], 'status') ~= 'queued' then return 1 end
redis.call('LREM', KEYS[1], 0, ARGV[1])
redis.call('DEL', KEYS[2], KEYS[3])
return 0
"""
ORPHAN_SCAN = 1000  # queued jobs looked at per queue and pass

CancelOutcome = Literal["canceled", "cancel_requested", "missing"] | str


class QueueFullError(Exception):
    """The model's queue already holds max_depth jobs; the job was not queued."""


def enqueue_job(
    redis: Redis,
    job_id: str,
    record: JobRecord,
    *,
    retries: int,
    ttl_s: int,
    max_depth: int = 0,
    max_live: int | None = None,
    aging_s: float = DEFAULT_AGING_S,
) -> None:
    """Write the job's record, put it on its model's RQ queue, give it its turn, and wake a worker.

    With `max_live` (the owner's quota), QuotaExceeded is raised, and nothing is queued, when the
    owner already has that many jobs queued or running. With `max_depth`, a job that lands at position
    max_depth or later is taken back (atomically, if no worker took it meanwhile) and QueueFullError
    is raised: concurrent submissions can never leave more than max_depth jobs queued.
    """
    model = record.model
    name = queue_name(model)
    redis.hset(record_key(job_id), mapping=record.creation_fields())  # type: ignore[arg-type]
    if max_live is not None and record.owner is not None:
        try:
            hold_slot(redis, record.owner, job_id, max_live)  # counts the record just written
        except Exception:
            redis.delete(record_key(job_id))
            raise
    with redis.pipeline() as pipe:
        index_job(pipe, job_id, record, ttl_s)
        if record.request.webhook_url is not None:
            watch_job(pipe, job_id, record)  # before a worker can see it, so no change goes unseen
        pipe.execute()
    Queue(name, connection=redis).enqueue(
        TASK_FUNCTION,
        job_id,
        job_id=job_id,
        retry=Retry(max=retries) if retries else None,
        result_ttl=ttl_s,
        failure_ttl=ttl_s,
        job_timeout=-1,
        description=f"dit-serve {record.kind} on {model}",
    )
    if max_depth and not redis.register_script(_KEEP_WITHIN_DEPTH_SCRIPT)(
        keys=[Queue(name, connection=redis).key, rq_job_key(job_id), record_key(job_id)],
        args=[job_id, max_depth],
    ):
        raise QueueFullError(f"the queue of {model} holds {max_depth} jobs")
    priority = record.request.priority
    schedule_job(
        redis,
        name,
        job_id,
        priority=priority,
        owner=record.owner,
        outputs=record.request.n,
        promote_at=promote_at(priority, record.created_at, aging_s),
    )
    with redis.pipeline() as pipe:
        if record.deadline is not None:
            pipe.zadd(DEADLINES_KEY, {job_id: record.deadline})
        pipe.lpush(wake_key(name), "1")
        pipe.ltrim(wake_key(name), 0, MAX_WAKE_TOKENS - 1)
        pipe.execute()


def cancel_job(redis: Redis, job_id: str, model: str, ttl_s: int) -> CancelOutcome:
    """Cancel a queued job at once, or flag a running one for its worker; returns what happened."""
    name = queue_name(model)
    queue = Queue(name, connection=redis)
    canceled = CanceledJobRegistry(name, connection=redis)
    now = time.time()
    result = redis.register_script(_CANCEL_SCRIPT)(
        keys=[
            rq_job_key(job_id),
            record_key(job_id),
            queue.key,
            canceled.key,
            ended_key(job_id),
            RETENTION_KEY,
            *scheduler_keys(name),
        ],
        args=[job_id, rq_timestamp(now), now + ttl_s, now, record_ttl_s(ttl_s)],
    )
    return result.decode() if isinstance(result, bytes) else str(result)


def queue_position(redis: Redis, model: str, job_id: str) -> int | None:
    """How many queued jobs go before this one (0: it is next); None when it is not in the queue.

    The scheduler's order (priority class, then fair-share turn); the RQ list's order for a job the
    scheduler has not seen yet (requeued, until the reaper's next pass).
    """
    name = queue_name(model)
    rank = queue_rank(redis, name, job_id)
    if rank is not None:
        return rank
    position = redis.lpos(Queue(name, connection=redis).key, job_id)
    return int(position) if position is not None else None  # type: ignore[arg-type]


def dit_queues(redis: Redis) -> list[Queue]:
    return [queue for queue in Queue.all(connection=redis) if queue.name.startswith(QUEUE_PREFIX)]


def wake_workers(redis: Redis, queue: str) -> None:
    """Tell idle workers of `queue` that a job is there (they block on this list, see worker/queue.py)."""
    with redis.pipeline() as pipe:
        pipe.lpush(wake_key(queue), "1")
        pipe.ltrim(wake_key(queue), 0, MAX_WAKE_TOKENS - 1)
        pipe.execute()


def reap_lost_jobs(
    redis: Redis,
    orphan_timeout_s: float | None = None,
    ttl_s: int = DEFAULT_TTL_S,
    aging_s: float = DEFAULT_AGING_S,
) -> None:
    """Requeue, or fail with `worker_lost`, the jobs whose worker stopped heartbeating.

    RQ runs its own `StartedJobRegistry.cleanup` only inside a worker's maintenance every 10 minutes, and
    spends a retry of every job the dead worker held; the API and every dit-serve worker call this
    every few seconds instead, with the policy of dit_serve/reaping.py (a job that shared its batch
    keeps its retries). So a lost job is back in the queue within heartbeat_ttl_s + reap_interval_s,
    at the front of its priority class; `reconcile` then schedules list entries that no script did
    (dit_serve/scheduling.py). With `orphan_timeout_s`, queued jobs that no live worker can take also
    fail (fail_orphaned_jobs).
    """
    # Many processes reap; one at a time (each queue's pass is one atomic script anyway).
    if not redis.set(REAPER_LOCK_KEY, "1", nx=True, px=REAPER_LOCK_MS):
        return
    for queue in dit_queues(redis):
        model = queue.name.removeprefix(QUEUE_PREFIX)
        try:
            reaped = reap_started(redis, queue.name, model, ttl_s, aging_s)
        except Exception:  # one bad queue must not stop the reaping of the rest
            log.exception("reaping queue %s failed", queue.name)
            reaped = []
        for job_id, outcome, deaths in reaped:
            log.warning("job %s of %s lost its worker (%d deaths so far): %s", job_id, model, deaths, outcome)
        reconcile(redis, queue.key, queue.name, aging_s)
        if any(outcome == REAPED_REQUEUED for _, outcome, _ in reaped):
            wake_workers(redis, queue.name)
    fail_expired_jobs(redis, ttl_s)
    if orphan_timeout_s is not None:
        fail_orphaned_jobs(redis, orphan_timeout_s, ttl_s)


def fail_queued_job(redis: Redis, queue: str, job_id: str, error: JobError, ttl_s: int) -> bool:
    """Fail a job if it is still queued (atomically), so that it never starts; False if it was not."""
    now = time.time()
    keys = [
        rq_job_key(job_id),
        record_key(job_id),
        Queue(queue, connection=redis).key,
        FailedJobRegistry(queue, connection=redis).key,
        ended_key(job_id),
        RETENTION_KEY,
        *scheduler_keys(queue),
    ]
    args: list[str | float] = [
        job_id,
        rq_timestamp(now),
        now + ttl_s,
        now,
        record_ttl_s(ttl_s),
        error.model_dump_json(),
    ]
    return bool(redis.register_script(_FAIL_QUEUED_SCRIPT)(keys=keys, args=args))


def queue_timeout_error(queue_timeout_s: int | None) -> JobError:
    return JobError(
        code=QUEUE_TIMEOUT,
        message=(
            f"the job was not started within its queue_timeout_s ({queue_timeout_s} s), so it was not "
            "run; submit it again with a longer queue_timeout_s, or when the queue is shorter"
        ),
    )


def fail_expired_jobs(redis: Redis, ttl_s: int) -> int:
    """Fail with `queue_timeout` the queued jobs whose deadline has passed; returns how many failed.

    Workers never take such a job (worker/queue.py checks the deadline atomically as it takes), so
    this only makes sure a job ends on time even when no worker looks at its queue.
    """
    due: list[bytes] = redis.zrangebyscore(DEADLINES_KEY, "-inf", time.time(), 0, EXPIRED_BATCH)  # type: ignore[assignment]
    failed = 0
    for raw_id in due:
        job_id = raw_id.decode()
        model, request = redis.hmget(record_key(job_id), [RecordField.MODEL, RecordField.REQUEST])  # type: ignore[misc]
        if model is not None and request is not None:
            timeout = JobRequest.model_validate_json(request).queue_timeout_s  # type: ignore[arg-type]
            error = queue_timeout_error(timeout)
            if fail_queued_job(redis, queue_name(model.decode()), job_id, error, ttl_s):  # type: ignore[union-attr]
                failed += 1
                log.info("job %s failed: not started within its queue_timeout_s", job_id)
        redis.zrem(DEADLINES_KEY, job_id)
    return failed


def fail_orphaned_jobs(redis: Redis, orphan_timeout_s: float, ttl_s: int) -> int:
    """Fail with `no_worker` the queued jobs whose model has had no live worker for orphan_timeout_s.

    A job is orphaned when the only worker serving its model died after accepting it, or when a
    restarted service no longer loads its model. The clock starts when the model's last worker
    registration expired, or when the job was accepted, whichever is later. Returns how many failed.
    """
    now = time.time()
    failed = 0
    for queue in dit_queues(redis):
        model = queue.name.removeprefix(QUEUE_PREFIX)
        until = served_until(redis, model) or 0.0
        if until > now - orphan_timeout_s:
            continue  # a worker serves it, or did so recently enough
        job_ids = [job_id.decode() for job_id in redis.lrange(queue.key, 0, ORPHAN_SCAN - 1)]  # type: ignore[union-attr]
        error = JobError(
            code=NO_WORKER,
            message=(
                f"no live worker has served model {model!r} for {orphan_timeout_s:.0f} s, so this job "
                f"was never run; start a worker serving it (dit-serve worker --model {model}=SOURCE) and "
                "submit the job again"
            ),
        )
        for job_id in job_ids:
            created_at = float(redis.hget(record_key(job_id), RecordField.CREATED_AT) or 0)  # type: ignore[arg-type]
            if max(until, created_at) > now - orphan_timeout_s:
                continue
            if fail_queued_job(redis, queue.name, job_id, error, ttl_s):
                failed += 1
                redis.hincrby(REAPED_KEY, f"{model}|{REAPED_ORPHANED}", 1)
                log.warning("job %s of %s failed: no live worker for %.0f s", job_id, model, orphan_timeout_s)
    return failed


def completions_per_s(redis: Redis, model: str, ttl_s: int, window_s: float) -> float:
    """How fast the model's jobs finished over the last window_s (from RQ's finished registry)."""
    registry = FinishedJobRegistry(queue_name(model), connection=redis)
    # Finished jobs are scored with their expiry, finish time + ttl_s (worker/queue.py).
    since = time.time() + ttl_s - window_s
    return int(redis.zcount(registry.key, since, "+inf")) / window_s  # type: ignore[arg-type]
