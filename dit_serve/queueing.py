"""Queue operations shared by the API and the workers: enqueue, cancel, and reaping lost jobs.

Every state change that must not race a worker is one Lua script, so it is atomic in Redis.
"""

import logging
import time
from collections.abc import Callable
from typing import Literal

from redis import Redis
from rq import Queue, Retry
from rq.job import Job
from rq.registry import CanceledJobRegistry, FailedJobRegistry, StartedJobRegistry

from dit_serve.catalog import served_until
from dit_serve.job_index import index_job
from dit_serve.jobs import (
    KEY_PREFIX,
    NO_WORKER,
    TASK_FUNCTION,
    JobError,
    JobRecord,
    RecordField,
    ended_key,
    queue_name,
    record_key,
    rq_job_key,
    wake_key,
)

log = logging.getLogger(__name__)

QUEUE_PREFIX = queue_name("")
MAX_WAKE_TOKENS = 64
REAPER_LOCK_KEY = f"{KEY_PREFIX}:reaper-lock"
REAPER_LOCK_MS = 1000  # at most one reaping pass per second across all processes
# Jobs whose worker stopped heartbeating, counted per "<model>|<outcome>" (the API exports them).
REAPED_KEY = f"{KEY_PREFIX}:stats:reaped"
REAPED_REQUEUED, REAPED_FAILED = "requeued", "failed"
REAPED_ORPHANED = "orphaned"  # queued, and failed with no_worker: no live worker for its model
DEFAULT_TTL_S = 7 * 24 * 3600

# KEYS: rq job, our record, the queue list, the canceled registry, the job's ended list.
# ARGV: job id, RQ timestamp string, registry score (expiry), unix now, ttl seconds.
_CANCEL_SCRIPT = """
local status = redis.call('HGET', KEYS[1], 'status')
if not status then return 'missing' end
if status == 'queued' or status == 'scheduled' or status == 'deferred' or status == 'created' then
  redis.call('LREM', KEYS[3], 0, ARGV[1])
  redis.call('HSET', KEYS[1], 'status', 'canceled', 'ended_at', ARGV[2])
  redis.call('ZADD', KEYS[4], ARGV[3], ARGV[1])
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

# Fail a job that is still queued (and only then), as no worker will ever take it.
# KEYS: rq job, our record, the queue list, the failed registry, the job's ended list.
# ARGV: job id, RQ timestamp string, registry score (expiry), unix now, ttl seconds, error JSON.
_FAIL_QUEUED_SCRIPT = """
if redis.call('HGET', KEYS[1], 'status') ~= 'queued' then return 0 end
redis.call('LREM', KEYS[3], 0, ARGV[1])
redis.call('HSET', KEYS[1], 'status', 'failed', 'ended_at', ARGV[2])
redis.call('ZADD', KEYS[4], ARGV[3], ARGV[1])
redis.call('HSET', KEYS[2], 'completed_at', ARGV[4], 'error', ARGV[6])
redis.call('EXPIRE', KEYS[1], ARGV[5])
redis.call('EXPIRE', KEYS[2], ARGV[5])
redis.call('RPUSH', KEYS[5], '1')
redis.call('EXPIRE', KEYS[5], ARGV[5])
return 1
"""
ORPHAN_SCAN = 1000  # queued jobs looked at per queue and pass

CancelOutcome = Literal["canceled", "cancel_requested", "missing"] | str


def rq_timestamp(unix: float | None = None) -> str:
    """The UTC timestamp format RQ stores in job hashes."""
    unix = time.time() if unix is None else unix
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(unix)) + f".{int(unix % 1 * 1e6):06d}Z"


def enqueue_job(redis: Redis, job_id: str, record: JobRecord, *, retries: int, ttl_s: int) -> None:
    """Write the job's record, then put it on its model's RQ queue and wake one idle worker."""
    model = record.model
    name = queue_name(model)
    with redis.pipeline() as pipe:
        pipe.hset(record_key(job_id), mapping=record.creation_fields())  # type: ignore[arg-type]
        index_job(pipe, job_id, record, ttl_s)
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
    with redis.pipeline() as pipe:
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
        keys=[rq_job_key(job_id), record_key(job_id), queue.key, canceled.key, ended_key(job_id)],
        args=[job_id, rq_timestamp(now), now + ttl_s, now, ttl_s],
    )
    return result.decode() if isinstance(result, bytes) else str(result)


def queue_position(redis: Redis, model: str, job_id: str) -> int | None:
    """0 for the job at the head of its queue; None when it is not in the queue."""
    position = redis.lpos(Queue(queue_name(model), connection=redis).key, job_id)
    return int(position) if position is not None else None  # type: ignore[arg-type]


def dit_queues(redis: Redis) -> list[Queue]:
    return [queue for queue in Queue.all(connection=redis) if queue.name.startswith(QUEUE_PREFIX)]


def _collect_into(jobs: list[Job]) -> Callable[..., None]:
    """An RQ exception handler, handler(job, *exc_info), that only notes the job."""

    def collect(job: Job, *_exc_info: object) -> None:
        jobs.append(job)

    return collect


def reap_lost_jobs(redis: Redis, orphan_timeout_s: float | None = None, ttl_s: int = DEFAULT_TTL_S) -> None:
    """Requeue (or fail, when out of retries) jobs whose worker stopped heartbeating.

    RQ's own `StartedJobRegistry.cleanup` does exactly this for expired entries, but RQ only runs it
    inside a worker's maintenance every 10 minutes; the API and every dit-serve worker call this
    every few seconds, so a lost job is back in the queue within heartbeat_ttl_s + reap_interval_s.
    With `orphan_timeout_s`, queued jobs that no live worker can take also fail (fail_orphaned_jobs).
    """
    # Many processes reap; one at a time, or two could requeue the same job twice.
    if not redis.set(REAPER_LOCK_KEY, "1", nx=True, px=REAPER_LOCK_MS):
        return
    for queue in dit_queues(redis):
        lost: list[Job] = []
        try:
            # RQ calls the handlers once per abandoned job, before it retries or fails the job.
            StartedJobRegistry(queue.name, connection=redis).cleanup(exception_handlers=[_collect_into(lost)])
        except Exception:  # one bad job record must not stop the reaping of the rest
            log.exception("reaping queue %s failed", queue.name)
        model = queue.name.removeprefix(QUEUE_PREFIX)
        for job in lost:
            outcome = REAPED_REQUEUED if job.retries_left else REAPED_FAILED
            redis.hincrby(REAPED_KEY, f"{model}|{outcome}", 1)
            log.warning("job %s of %s lost its worker: %s", job.id, model, outcome)
    if orphan_timeout_s is not None:
        fail_orphaned_jobs(redis, orphan_timeout_s, ttl_s)


def fail_orphaned_jobs(redis: Redis, orphan_timeout_s: float, ttl_s: int) -> int:
    """Fail with `no_worker` the queued jobs whose model has had no live worker for orphan_timeout_s.

    A job is orphaned when the only worker serving its model died after accepting it, or when a
    restarted service no longer loads its model. The clock starts when the model's last worker
    registration expired, or when the job was accepted, whichever is later. Returns how many failed.
    """
    now = time.time()
    failed = 0
    fail_queued = redis.register_script(_FAIL_QUEUED_SCRIPT)
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
        ).model_dump_json()
        failed_registry = FailedJobRegistry(queue.name, connection=redis).key
        for job_id in job_ids:
            created_at = float(redis.hget(record_key(job_id), RecordField.CREATED_AT) or 0)  # type: ignore[arg-type]
            if max(until, created_at) > now - orphan_timeout_s:
                continue
            if fail_queued(
                keys=[rq_job_key(job_id), record_key(job_id), queue.key, failed_registry, ended_key(job_id)],
                args=[job_id, rq_timestamp(now), now + ttl_s, now, ttl_s, error],
            ):
                failed += 1
                redis.hincrby(REAPED_KEY, f"{model}|{REAPED_ORPHANED}", 1)
                log.warning("job %s of %s failed: no live worker for %.0f s", job_id, model, orphan_timeout_s)
    return failed
