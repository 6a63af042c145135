"""Webhook deliveries in Redis: the watched jobs, each delivery's state, the retry schedule, the claim.

The API marks a job with a `webhook_url` as watched when it queues it. A sender thread in every API
process (app/webhook_sender.py) polls the watched jobs' state and turns changes into deliveries, then
sends the due ones. Polling the job's state, rather than being told by whoever changes it, catches
every way a job starts and ends (a worker, a cancel, a deadline, the reaper) and keeps the sampling
loop free of HTTP.

Redis layout:
- `dit:webhooks:watched`: sorted set, job id -> acceptance time: jobs with a webhook not yet ended.
- `dit:webhooks:due`: sorted set, delivery id -> when its next attempt is due. A claimed delivery is
  scored with the end of its lease instead, so no other sender takes it while it is in flight, and a
  sender that dies mid-attempt leaves it due again when the lease ends (at least once).
- `dit:webhook:<job id>`: hash, the job's webhook: `url`, `events`, `owner` (the API key whose secret
  signs), and per event slot (`started`, `progress`, `completed`) the slot's current delivery:
  `<slot>:id`, `:type`, `:state`, `:attempts`, `:last_status`, `:last_error`, `:delivered_at`,
  `:next_attempt_at`, `:created_at` and, until it is delivered or given up, `:body`. It has no expiry
  while the job runs (like the job's record) and expires with the job once the job has ended.

A delivery's id, sent as `webhook-id` on each of its attempts, is `<job id>:<slot>`, or
`<job id>:progress:<n>` for the n-th progress event: creating it is one Lua script that does nothing
when that delivery exists already, so any number of API replicas polling the same job create it once.
Progress is latest-wins: a progress event still undelivered when the next one is due is replaced by
it, and one still undelivered when the job ends is dropped (`superseded`).
"""

import random
import time
from collections.abc import Callable
from dataclasses import dataclass
from enum import StrEnum

from pydantic import BaseModel, Field
from redis import Redis
from redis.client import Pipeline

from dit_serve.contract import WebhookEvent
from dit_serve.jobs import KEY_PREFIX, JobRecord

WATCHED_KEY = f"{KEY_PREFIX}:webhooks:watched"
DUE_KEY = f"{KEY_PREFIX}:webhooks:due"
SCAN_LOCK_KEY = f"{KEY_PREFIX}:webhooks:scan-lock"
STATE_PREFIX = f"{KEY_PREFIX}:webhook:"
# Retries: after the k-th failed attempt the next one waits base * 4^(k-1), at most MAX_BACKOFF_S,
# stretched by a random 0-50% so that receivers coming back from an outage are not hit all at once.
BACKOFF_FACTOR = 4
MAX_BACKOFF_S = 1800.0
JITTER = 0.5
DEFAULT_BACKOFF_S = 5.0  # with 8 attempts: 5 s, 20 s, 80 s, 320 s, 1280 s, 30 min, 30 min: 88 min at least
DEFAULT_MAX_ATTEMPTS = 8
LEASE_S = 60.0  # a claimed attempt is the claimer's for this long; an attempt takes 5 s at most
PROGRESS_INTERVAL_S = 0.5  # at most one progress event per job this often
SLOTS = tuple(WebhookEvent)


class DeliveryState(StrEnum):
    PENDING = "pending"  # waiting for its next attempt, or in flight
    DELIVERED = "delivered"  # a 2xx answer came
    FAILED = "failed"  # out of attempts
    SUPERSEDED = "superseded"  # a progress event replaced by a later one, or dropped when the job ended


class WebhookDelivery(BaseModel):
    """One event's delivery, as the job object shows it."""

    event: WebhookEvent
    id: str = Field(description="sent as `webhook-id` with every attempt: receivers drop repeats by it")
    type: str = Field(description="the payload's `type`: job.started, job.progress, job.completed, ...")
    status: DeliveryState
    attempts: int
    last_status: int | None = Field(None, description="the HTTP status of the last attempt, if it got one")
    last_error: str | None = Field(None, description="why the last attempt got no HTTP status, if it did not")
    delivered_at: float | None = None
    next_attempt_at: float | None = Field(None, description="when it is tried again; null when not")


@dataclass(frozen=True)
class Claim:
    """A due delivery that this sender may attempt now (it holds the lease)."""

    id: str
    job_id: str
    event: WebhookEvent
    attempts: int  # counting this one
    url: str
    owner: str | None
    body: bytes


def state_key(job_id: str) -> str:
    return f"{STATE_PREFIX}{job_id}"


def retry_delay_s(attempts: int, base_s: float, draw: Callable[[], float] = random.random) -> float:
    """How long to wait after the `attempts`-th failed attempt before the next one."""
    return min(base_s * BACKOFF_FACTOR ** (attempts - 1), MAX_BACKOFF_S) * (1 + JITTER * draw())


def retry_span_s(base_s: float, max_attempts: int) -> float:
    """The longest time from a delivery's first attempt to its last (every wait at its longest)."""
    return sum(retry_delay_s(k, base_s, lambda: 1.0) for k in range(1, max_attempts))


def state_ttl_s(job_ttl_s: int, base_s: float, max_attempts: int) -> int:
    """How long an ended job's webhook state is kept: as long as the job, or its last retry if later."""
    return int(max(job_ttl_s, retry_span_s(base_s, max_attempts) + LEASE_S)) + 1


def watch_job(pipe: Pipeline, job_id: str, record: JobRecord) -> None:
    """Queue the commands that mark a new job's webhook as watched on `pipe` (the enqueue's pipeline)."""
    request = record.request
    assert request.webhook_url is not None
    events = request.webhook_events or [WebhookEvent.COMPLETED]
    fields = {"url": request.webhook_url, "events": ",".join(event.value for event in events)}
    if record.owner is not None:
        fields["owner"] = record.owner
    pipe.hset(state_key(job_id), mapping=fields)  # type: ignore[arg-type]
    pipe.zadd(WATCHED_KEY, {job_id: record.created_at})


def watched_jobs(redis: Redis, limit: int) -> list[str]:
    """The oldest `limit` watched jobs."""
    return [raw.decode() for raw in redis.zrange(WATCHED_KEY, 0, limit - 1)]  # type: ignore[union-attr]


def forget_job(redis: Redis, job_id: str) -> None:
    """Stop watching a job whose record is gone (expired, or taken back when its queue was full)."""
    with redis.pipeline() as pipe:
        pipe.zrem(WATCHED_KEY, job_id)
        pipe.delete(state_key(job_id))
        pipe.execute()


# Create a slot's delivery unless it exists (progress: unless too soon or unchanged).
# KEYS: state, due. ARGV: slot, delivery id (progress: without its number), type, body, unix now,
# progress value, progress interval. Returns the new delivery's id, or false.
_CREATE_SCRIPT = """
if redis.call('EXISTS', KEYS[1]) == 0 or redis.call('HEXISTS', KEYS[1], 'ended') == 1 then return false end
local slot, id, now = ARGV[1], ARGV[2], tonumber(ARGV[5])
if slot == 'progress' then
  local last = redis.call('HMGET', KEYS[1], 'progress:value', 'progress:created_at', 'progress:id',
    'progress:state')
  if last[1] == ARGV[6] then return false end
  if last[2] and now - tonumber(last[2]) < tonumber(ARGV[7]) then return false end
  if last[3] and last[4] == 'pending' then redis.call('ZREM', KEYS[2], last[3]) end
  id = id .. ':' .. redis.call('HINCRBY', KEYS[1], 'progress:seq', 1)
  redis.call('HSET', KEYS[1], 'progress:value', ARGV[6])
elseif redis.call('HEXISTS', KEYS[1], slot .. ':id') == 1 then
  return false
end
redis.call('HDEL', KEYS[1], slot .. ':last_status', slot .. ':last_error', slot .. ':delivered_at')
redis.call('HSET', KEYS[1], slot .. ':id', id, slot .. ':type', ARGV[3], slot .. ':state', 'pending',
  slot .. ':attempts', 0, slot .. ':created_at', ARGV[5], slot .. ':next_attempt_at', ARGV[5],
  slot .. ':body', ARGV[4])
redis.call('ZADD', KEYS[2], now, id)
return id
"""

# The job has ended: stop watching it, drop an undelivered progress event, expire with the job.
# KEYS: state, due, watched. ARGV: job id, ttl.
_END_SCRIPT = """
redis.call('ZREM', KEYS[3], ARGV[1])
if redis.call('EXISTS', KEYS[1]) == 0 then return 0 end
redis.call('HSET', KEYS[1], 'ended', '1')
local progress = redis.call('HMGET', KEYS[1], 'progress:id', 'progress:state')
if progress[1] and progress[2] == 'pending' then
  redis.call('ZREM', KEYS[2], progress[1])
  redis.call('HSET', KEYS[1], 'progress:state', 'superseded', 'progress:next_attempt_at', '')
  redis.call('HDEL', KEYS[1], 'progress:body')
end
redis.call('EXPIRE', KEYS[1], ARGV[2])
return 1
"""

# Claim up to ARGV[3] due deliveries: each gets a lease (its score moves to now + lease) and one more
# attempt. A delivery whose slot moved on is dropped; one that used its last attempt under a sender
# that never reported (it died) is given up. KEYS: due. ARGV: unix now, lease s, limit, max attempts,
# state key prefix. Returns {id, slot, attempts, url, owner, body} per claim.
_CLAIM_SCRIPT = """
local now = tonumber(ARGV[1])
local claimed = {}
for _, id in ipairs(redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', now, 'LIMIT', 0, tonumber(ARGV[3]))) do
  local job, slot = string.match(id, '^([^:]+):([^:]+)')
  local key = ARGV[5] .. (job or '')
  local d = {}
  if slot then
    d = redis.call('HMGET', key, slot .. ':id', slot .. ':state', slot .. ':attempts', 'url', 'owner',
      slot .. ':body')
  end
  if not slot or d[1] ~= id or d[2] ~= 'pending' or not d[6] then
    redis.call('ZREM', KEYS[1], id)
  elseif tonumber(d[3]) >= tonumber(ARGV[4]) then
    redis.call('ZREM', KEYS[1], id)
    redis.call('HSET', key, slot .. ':state', 'failed', slot .. ':next_attempt_at', '')
    redis.call('HDEL', key, slot .. ':body')
  else
    local attempts = redis.call('HINCRBY', key, slot .. ':attempts', 1)
    redis.call('HSET', key, slot .. ':next_attempt_at', '')
    redis.call('ZADD', KEYS[1], now + tonumber(ARGV[2]), id)
    claimed[#claimed + 1] = {id, slot, attempts, d[4], d[5], d[6]}
  end
end
return claimed
"""

# Record an attempt's outcome, if the slot still holds that delivery. KEYS: state, due.
# ARGV: id, slot, outcome (delivered | retry | failed), unix now, HTTP status or '', error or '',
# next attempt time (retry).
_RECORD_SCRIPT = """
local slot = ARGV[2]
local d = redis.call('HMGET', KEYS[1], slot .. ':id', slot .. ':state')
if d[1] ~= ARGV[1] then
  redis.call('ZREM', KEYS[2], ARGV[1])
  return 0
end
redis.call('HSET', KEYS[1], slot .. ':last_status', ARGV[5], slot .. ':last_error', ARGV[6])
if ARGV[3] == 'delivered' then
  redis.call('HSET', KEYS[1], slot .. ':state', 'delivered', slot .. ':delivered_at', ARGV[4],
    slot .. ':next_attempt_at', '')
elseif ARGV[3] == 'retry' and d[2] == 'pending' then
  redis.call('HSET', KEYS[1], slot .. ':next_attempt_at', ARGV[7])
  redis.call('ZADD', KEYS[2], ARGV[7], ARGV[1])
  return 1
elseif d[2] == 'pending' then
  redis.call('HSET', KEYS[1], slot .. ':state', 'failed', slot .. ':next_attempt_at', '')
end
redis.call('HDEL', KEYS[1], slot .. ':body')
redis.call('ZREM', KEYS[2], ARGV[1])
return 1
"""


def create_delivery(
    redis: Redis,
    job_id: str,
    event: WebhookEvent,
    event_type: str,
    body: bytes,
    progress: int = 0,
    progress_interval_s: float = PROGRESS_INTERVAL_S,
) -> str | None:
    """Create the job's delivery of `event` with this payload, once; its id, or None when it was not
    created (it exists, the job's webhook has ended or is gone, or a progress event is unchanged or
    too soon after the last)."""
    created = redis.register_script(_CREATE_SCRIPT)(
        keys=[state_key(job_id), DUE_KEY],
        args=[
            event.value,
            f"{job_id}:{event.value}",
            event_type,
            body,
            time.time(),
            progress,
            progress_interval_s,
        ],
    )
    return created.decode() if created else None


def end_watch(redis: Redis, job_id: str, ttl_s: int) -> None:
    """The job has ended (its final delivery, if asked for, created): stop watching it."""
    redis.register_script(_END_SCRIPT)(keys=[state_key(job_id), DUE_KEY, WATCHED_KEY], args=[job_id, ttl_s])


def claim_due(redis: Redis, limit: int, max_attempts: int, lease_s: float = LEASE_S) -> list[Claim]:
    """Claim up to `limit` deliveries whose attempt is due; atomic, so each goes to one sender."""
    rows = redis.register_script(_CLAIM_SCRIPT)(
        keys=[DUE_KEY], args=[time.time(), lease_s, limit, max_attempts, STATE_PREFIX]
    )
    return [
        Claim(
            id=raw_id.decode(),
            job_id=raw_id.decode().split(":", 1)[0],
            event=WebhookEvent(slot.decode()),
            attempts=int(attempts),
            url=url.decode(),
            owner=owner.decode() if owner else None,
            body=body,
        )
        for raw_id, slot, attempts, url, owner, body in rows
    ]


def record_attempt(
    redis: Redis,
    claim: Claim,
    *,
    delivered: bool,
    status: int | None,
    error: str | None,
    next_attempt_at: float | None,
) -> None:
    """Record what an attempt got: delivered, retried at `next_attempt_at`, or (None) given up."""
    outcome = "delivered" if delivered else "retry" if next_attempt_at is not None else "failed"
    redis.register_script(_RECORD_SCRIPT)(
        keys=[state_key(claim.job_id), DUE_KEY],
        args=[
            claim.id,
            claim.event.value,
            outcome,
            time.time(),
            "" if status is None else status,
            error or "",
            next_attempt_at or "",
        ],
    )


def job_deliveries(redis: Redis, job_id: str) -> list[WebhookDelivery]:
    """The job's deliveries, one per event slot that has had one, in event order."""
    raw: dict[bytes, bytes] = redis.hgetall(state_key(job_id))  # type: ignore[assignment]
    fields = {key.decode(): value.decode() for key, value in raw.items() if not key.endswith(b":body")}
    found = []
    for slot in SLOTS:
        if f"{slot.value}:id" not in fields:
            continue

        def value(name: str, slot: WebhookEvent = slot) -> str | None:
            return fields.get(f"{slot.value}:{name}") or None

        found.append(
            WebhookDelivery(
                event=slot,
                id=fields[f"{slot.value}:id"],
                type=value("type") or "",
                status=DeliveryState(value("state") or DeliveryState.PENDING),
                attempts=int(value("attempts") or 0),
                last_status=int(status) if (status := value("last_status")) else None,
                last_error=value("last_error"),
                delivered_at=float(at) if (at := value("delivered_at")) else None,
                next_attempt_at=float(at) if (at := value("next_attempt_at")) else None,
            )
        )
    return found
