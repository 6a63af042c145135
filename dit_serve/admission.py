"""Per-key admission limits, kept in Redis so every API replica enforces the same ones.

- A token bucket per key (`rate_per_min`): it holds at most a minute's worth of submissions and
  refills continuously, so a key may burst up to its per-minute rate and then keeps to it. Time comes
  from Redis (`TIME`), so replicas with skewed clocks share one bucket exactly.
- A quota of queued-plus-running jobs per key (`max_queued`): a set of the key's live job ids. Each
  check drops the ids of jobs that have ended, so no code path that ends a job (a worker, a cancel,
  the reaper, a record that expired) has to remember to release its slot.
"""

from redis import Redis

from dit_serve.jobs import KEY_PREFIX, record_key, rq_job_key

SECONDS_PER_MINUTE = 60.0

# KEYS: the bucket hash. ARGV: capacity (tokens), refill (tokens per second).
# Returns {1, ''} when a token was taken, else {0, seconds until one is there (a string)}.
_TAKE_TOKEN_SCRIPT = """
local clock = redis.call('TIME')
local now = tonumber(clock[1]) + tonumber(clock[2]) / 1000000
local capacity, refill = tonumber(ARGV[1]), tonumber(ARGV[2])
local bucket = redis.call('HMGET', KEYS[1], 'tokens', 'at')
local tokens = tonumber(bucket[1]) or capacity
local at = tonumber(bucket[2]) or now
tokens = math.min(capacity, tokens + math.max(0, now - at) * refill)
if tokens < 1 then return {0, tostring((1 - tokens) / refill)} end
redis.call('HSET', KEYS[1], 'tokens', tostring(tokens - 1), 'at', tostring(now))
redis.call('PEXPIRE', KEYS[1], math.ceil(capacity / refill * 1000) + 1000)
return {1, ''}
"""

# KEYS: the key's live-job set. ARGV: the new job's id, the quota, rq job key prefix, record prefix.
# A member counts while RQ has it queued or started, or while its record exists without an RQ job
# (an API is queueing it right now); any other member has ended and is dropped.
# Returns {1, live jobs before this one} when admitted (the id is added), else {0, live jobs}.
_HOLD_SLOT_SCRIPT = """
local live = 0
for _, id in ipairs(redis.call('SMEMBERS', KEYS[1])) do
  local status = redis.call('HGET', ARGV[3] .. id, 'status')
  if status == 'queued' or status == 'started' or status == 'deferred' or status == 'scheduled'
      or (not status and redis.call('EXISTS', ARGV[4] .. id) == 1) then
    live = live + 1
  else
    redis.call('SREM', KEYS[1], id)
  end
end
if live >= tonumber(ARGV[2]) then return {0, live} end
redis.call('SADD', KEYS[1], ARGV[1])
return {1, live}
"""


def bucket_key(owner: str) -> str:
    return f"{KEY_PREFIX}:ratelimit:{owner}"


def live_jobs_key(owner: str) -> str:
    return f"{KEY_PREFIX}:live:{owner}"


class RateLimited(Exception):
    """The key's bucket is empty; a token is there again in `retry_after_s`."""

    def __init__(self, retry_after_s: float):
        super().__init__(f"no submission left; the next one in {retry_after_s:.1f} s")
        self.retry_after_s = retry_after_s


class QuotaExceeded(Exception):
    """The key already has `live` jobs queued or running, its quota."""

    def __init__(self, live: int):
        super().__init__(f"{live} jobs queued or running")
        self.live = live


def take_token(redis: Redis, owner: str, rate_per_min: int) -> None:
    """Spend one of the key's submissions; RateLimited when its bucket is empty."""
    taken, wait = redis.register_script(_TAKE_TOKEN_SCRIPT)(
        keys=[bucket_key(owner)], args=[rate_per_min, rate_per_min / SECONDS_PER_MINUTE]
    )
    if not taken:
        raise RateLimited(float(wait))


def hold_slot(redis: Redis, owner: str, job_id: str, max_live: int) -> None:
    """Count job `job_id` (its record already written) against the key's quota, atomically; QuotaExceeded
    when the key already has `max_live` jobs queued or running."""
    admitted, live = redis.register_script(_HOLD_SLOT_SCRIPT)(
        keys=[live_jobs_key(owner)], args=[job_id, max_live, rq_job_key(""), record_key("")]
    )
    if not admitted:
        raise QuotaExceeded(int(live))
