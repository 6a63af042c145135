"""Jobs whose worker died or hung: requeued at no cost to their neighbours, or failed when they ran alone.

RQ's `StartedJobRegistry.cleanup` spends one retry (`Retry(max=DIT_JOB_RETRIES)`) of every job a dead
worker held, so the innocent neighbours of a job that kills its worker run out of retries with it and
end `worker_lost`. Our own reaping (a Lua script over the same registry, atomic per queue) keeps RQ's
registries and job hashes as RQ's cleanup would, so `rq info` stays right, with this policy instead:

- every death of a worker counts against each job it held (`deaths` in the job's record);
- a death while the job shared its sampling run with other jobs (or waited for its turn) costs it no
  retry: the job is requeued at the front of its class;
- a death while the job ran alone spends one of its RQ retries; with none left it fails `worker_lost`;
- a job held by SOLO_AFTER_DEATHS dead workers is only taken alone from then on (`solo`, read by the
  take script in worker/queue.py), and a solo job that dies fails `worker_lost` at once.

So a job that kills its worker does so at most SOLO_AFTER_DEATHS + 1 times, and the jobs that shared a
batch with it complete with their retries intact. `worker_lost` means: the worker died while this job
ran alone. A worker whose batch runs past its ceiling (worker/watchdog.py) gives its jobs back through
`give_up` before it exits: a job that ran alone fails `timeout`, one that shared the batch is requeued
once, solo, and one that only waited for its turn is requeued as it was.

A requeued job is put back on the RQ list (at its head) and, in the same script, at the front of its
priority class in the scheduler's sets (dit_serve/scheduling.py), so the jobs of a dead worker's batch
come back together, ahead of the jobs that have not waited yet.
"""

import time
from enum import StrEnum

from redis import Redis
from rq import Queue
from rq.registry import FailedJobRegistry, StartedJobRegistry

from dit_serve.jobs import (
    KEY_PREFIX,
    TIMEOUT_ERROR,
    WORKER_LOST,
    RecordField,
    ended_key,
    record_key,
    rq_job_key,
    rq_timestamp,
)
from dit_serve.retention import RECORD_TTL_SLACK_S, RETENTION_KEY
from dit_serve.scheduling import DEFAULT_AGING_S, SCHEDULE_FRONT_LUA, scheduler_keys

# Jobs given back by the reapers and hung workers, counted per "<model>|<outcome>" (the API exports them).
REAPED_KEY = f"{KEY_PREFIX}:stats:reaped"
REAPED_REQUEUED, REAPED_FAILED = "requeued", "failed"  # failed: worker_lost
REAPED_TIMED_OUT = "timed_out"  # failed with timeout: it ran alone past its ceiling
REAPED_ORPHANED = "orphaned"  # queued, and failed with no_worker: no live worker for its model
SOLO_AFTER_DEATHS = 2  # a job held by this many dead workers is only taken alone
REAP_BATCH = 1000  # expired registry entries looked at per queue and pass


class HeldRole(StrEnum):
    """What a job was doing when its worker gave it back."""

    ALONE = "alone"  # sampling, with no other job: it alone is to blame
    SHARED = "shared"  # sampling with other jobs: any of them may be
    WAITING = "waiting"  # held but not sampling: waiting for its turn to run apart


# Shared by both scripts. KEYS: StartedJobRegistry, the queue list, FailedJobRegistry, REAPED_KEY, then
# scheduler_keys(queue) (5-9), the retention set (10). ARGV: unix now, RQ timestamp, ttl, model, rq job
# key prefix, record key prefix, ended key prefix, priority aging seconds.
_COMMON_LUA = (
    SCHEDULE_FRONT_LUA
    + f"""
local now, rq_now, ttl, model = tonumber(ARGV[1]), ARGV[2], ARGV[3], ARGV[4]

local function keys_of(id)
  return ARGV[5] .. id, ARGV[6] .. id
end

-- Queued again, as RQ's retry leaves a job, at the head of the RQ list and of its priority class.
local function requeue(id, job_key, rec_key)
  redis.call('HSET', job_key, 'status', 'queued', 'enqueued_at', rq_now)
  redis.call('LREM', KEYS[2], 0, id)
  redis.call('LPUSH', KEYS[2], id)
  if redis.call('EXISTS', rec_key) == 1 then
    redis.call('HSET', rec_key, '{RecordField.PROGRESS}', 0, '{RecordField.BATCH_JOBS}', 0)
    local rec = redis.call('HMGET', rec_key, '{RecordField.PRIORITY}', '{RecordField.CREATED_AT}')
    schedule_front(4, id, rec[1], rec[2], tonumber(ARGV[8]))
  end
  redis.call('HINCRBY', KEYS[4], model .. '|{REAPED_REQUEUED}', 1)
  return '{REAPED_REQUEUED}'
end

-- Failed, in RQ's failed registry and in our record, as the worker's settle script leaves a job, and
-- handed to the retention sweep (dit_serve/retention.py), which deletes its records after ttl.
local function fail(id, job_key, rec_key, error, outcome)
  local keep = tonumber(ttl) + {RECORD_TTL_SLACK_S}
  redis.call('HSET', job_key, 'status', 'failed', 'ended_at', rq_now)
  redis.call('ZADD', KEYS[3], now + tonumber(ttl), id)
  redis.call('ZADD', KEYS[10], now + tonumber(ttl), id)
  redis.call('EXPIRE', job_key, keep)
  if redis.call('EXISTS', rec_key) == 1 then
    redis.call('HSET', rec_key, '{RecordField.COMPLETED_AT}', ARGV[1], '{RecordField.ERROR}', error)
    redis.call('EXPIRE', rec_key, keep)
  end
  local ended = ARGV[7] .. id
  redis.call('RPUSH', ended, '1')
  redis.call('EXPIRE', ended, keep)
  redis.call('HINCRBY', KEYS[4], model .. '|' .. outcome, 1)
  return outcome
end
"""
)

# Reap the expired entries of one StartedJobRegistry. ARGV 9-11: SOLO_AFTER_DEATHS, the worker_lost
# error JSON, most entries per call. Returns {job id, outcome, deaths} for each job reaped.
_REAP_SCRIPT = (
    _COMMON_LUA
    + f"""
local out = {{}}
for _, member in ipairs(redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', now, 'LIMIT', 0, tonumber(ARGV[11]))) do
  redis.call('ZREM', KEYS[1], member)
  local id, execution = string.match(member, '^(.*):([^:]*)$')
  if not id then id, execution = member, '' end
  local job_key, rec_key = keys_of(id)
  -- Only a started job was lost; RQ's cleanup leaves leftovers of ended jobs alone too.
  if redis.call('HGET', job_key, 'status') == 'started' then
    local rec = redis.call('HMGET', rec_key, '{RecordField.EXECUTION}', '{RecordField.SOLO}',
      '{RecordField.BATCH_JOBS}')
    local current = rec[1] or ''
    -- An entry of an older execution, while a later one holds the job and has its own entry: stale.
    if current == execution or current == '' or not redis.call('ZSCORE', KEYS[1], id .. ':' .. current) then
      local deaths = redis.call('HINCRBY', rec_key, '{RecordField.DEATHS}', 1)
      local solo = rec[2] == '1'
      -- A record without a batch size was taken by a worker older than this policy: alone, as before.
      local alone = solo or tonumber(rec[3] or '1') == 1
      local retries = tonumber(redis.call('HGET', job_key, 'retries_left') or '0') or 0
      local outcome
      if alone and (solo or retries <= 0) then
        outcome = fail(id, job_key, rec_key, ARGV[10], '{REAPED_FAILED}')
      else
        if alone then redis.call('HSET', job_key, 'retries_left', retries - 1) end
        if deaths >= tonumber(ARGV[9]) then redis.call('HSET', rec_key, '{RecordField.SOLO}', '1') end
        outcome = requeue(id, job_key, rec_key)
      end
      out[#out + 1] = id
      out[#out + 1] = outcome
      out[#out + 1] = deaths
    end
  end
end
return out
"""
)

# Give back the jobs of a hung worker (it still holds them: each must still be started under the given
# execution). ARGV 9: the timeout error JSON; then (job id, execution, HeldRole) for each job.
# Returns {job id, outcome} for each job given back.
_GIVE_UP_SCRIPT = (
    _COMMON_LUA
    + f"""
local out = {{}}
for i = 10, #ARGV, 3 do
  local id, execution, role = ARGV[i], ARGV[i + 1], ARGV[i + 2]
  local job_key, rec_key = keys_of(id)
  if redis.call('HGET', job_key, 'status') == 'started'
      and redis.call('HGET', rec_key, '{RecordField.EXECUTION}') == execution then
    redis.call('ZREM', KEYS[1], id .. ':' .. execution)
    local outcome
    if role == '{HeldRole.ALONE}' then
      outcome = fail(id, job_key, rec_key, ARGV[9], '{REAPED_TIMED_OUT}')
    else
      -- Any job of the batch may have hung it: each runs alone next time, and times out alone.
      if role == '{HeldRole.SHARED}' then redis.call('HSET', rec_key, '{RecordField.SOLO}', '1') end
      outcome = requeue(id, job_key, rec_key)
    end
    out[#out + 1] = id
    out[#out + 1] = outcome
  end
end
return out
"""
)


def _keys_and_args(
    redis: Redis, queue: str, model: str, ttl_s: int, aging_s: float
) -> tuple[list[str], list[str | float]]:
    now = time.time()
    keys = [
        StartedJobRegistry(queue, connection=redis).key,
        Queue(queue, connection=redis).key,
        FailedJobRegistry(queue, connection=redis).key,
        REAPED_KEY,
        *scheduler_keys(queue),
        RETENTION_KEY,
    ]
    prefixes = [rq_job_key(""), record_key(""), ended_key("")]
    args: list[str | float] = [now, rq_timestamp(now), ttl_s, model, *prefixes, aging_s]
    return keys, args


def reap_started(
    redis: Redis, queue: str, model: str, ttl_s: int, aging_s: float = DEFAULT_AGING_S
) -> list[tuple[str, str, int]]:
    """Requeue or fail the jobs of `queue` whose heartbeat deadline passed; returns (job id, outcome,
    deaths) for each. `aging_s`: when a requeued low job is promoted (dit_serve/scheduling.py)."""
    keys, args = _keys_and_args(redis, queue, model, ttl_s, aging_s)
    args += [SOLO_AFTER_DEATHS, WORKER_LOST.model_dump_json(), REAP_BATCH]
    reply = redis.register_script(_REAP_SCRIPT)(keys=keys, args=args)
    return [
        (reply[i].decode(), reply[i + 1].decode(), int(reply[i + 2]))  # type: ignore[index]
        for i in range(0, len(reply), 3)  # type: ignore[arg-type]
    ]


def give_up(
    redis: Redis,
    queue: str,
    model: str,
    jobs: list[tuple[str, str, HeldRole]],
    ttl_s: int,
    aging_s: float = DEFAULT_AGING_S,
) -> list[tuple[str, str]]:
    """Give back the jobs a hung worker holds: (job id, execution, role) each; returns (job id, outcome)."""
    keys, args = _keys_and_args(redis, queue, model, ttl_s, aging_s)
    args.append(TIMEOUT_ERROR.model_dump_json())
    for job_id, execution, role in jobs:
        args += [job_id, execution, role.value]
    reply = redis.register_script(_GIVE_UP_SCRIPT)(keys=keys, args=args)
    return [(reply[i].decode(), reply[i + 1].decode()) for i in range(0, len(reply), 2)]  # type: ignore[index, arg-type]
