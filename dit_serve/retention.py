"""Retention: an ended job's outputs and records are deleted `job_ttl_s` after it ended.

Every path that ends a job adds it, in the same Lua script (or right after RQ's own cleanup), to one
sorted set, RETENTION_KEY, scored by when it expires: the worker's settle (completed, failed,
canceled), the take script's cancel of a flagged queued job (worker/queue.py), the cancel or fail of a
queued job, and RQ's cleanup failing a lost job (dit_serve/queueing.py). The records also get
`record_ttl_s`, a safety net a day longer than job_ttl_s, so that the sweep, not Redis, removes them.

The sweep (`sweep_expired_jobs`, run by every API replica) claims due jobs atomically, so that each
job is swept by one sweeper at a time, then for each one, in one Lua script, replaces its records
with an expiry marker (`dit:expired:<id>`, holding the owner, kept `expired_grace_s`), and then
deletes its outputs (every key under `jobs/<id>/`). A job leaves the set only once both are done: a
sweeper that dies or meets a storage fault leaves its claim to lapse, and the job is swept again.
While the marker lives, the API answers 410 `job_expired` to the job's owner (404 to anyone else);
after it, 404 `job_not_found`.

This module is imported by the API, so it must not import torch or the web stack.
"""

import logging
import time
from collections.abc import Mapping
from dataclasses import dataclass

from redis import Redis
from redis.client import Pipeline
from redis.exceptions import RedisError
from rq.registry import CanceledJobRegistry, FailedJobRegistry, FinishedJobRegistry
from rq.results import Result

from dit_serve.events import events_key
from dit_serve.job_index import ALL_JOBS_KEY, owner_index_key
from dit_serve.jobs import KEY_PREFIX, RecordField, ended_key, queue_name, record_key, rq_job_key
from dit_serve.storage import Storage, output_prefix

log = logging.getLogger(__name__)

RETENTION_KEY = f"{KEY_PREFIX}:retention"  # sorted set: ended job id -> unix time it expires
RECORD_TTL_SLACK_S = 24 * 3600  # records outlive job_ttl_s by this, so the sweep removes them first
SWEEP_BATCH = 100  # jobs claimed per round trip
SWEEP_LEASE_S = 300  # a claimed job not swept within this long (its sweeper died) is claimed again
MARKER_EXPIRED_AT = "expired_at"

# Claim the due jobs: push their score to the end of the lease, so that no other sweeper sees them
# due until then. KEYS: the retention set. ARGV: now, how many, lease end. Returns the claimed ids.
_CLAIM_SCRIPT = """
local due = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', ARGV[1], 'LIMIT', 0, tonumber(ARGV[2]))
for _, id in ipairs(due) do redis.call('ZADD', KEYS[1], 'XX', ARGV[3], id) end
return due
"""

# Replace an ended job's records with its expiry marker. A job that is queued or running again (an
# operator's `rq requeue` of a failed job) is not expired: it leaves the set, and its next end adds it
# back. The marker is written only while the record, which names the owner, exists.
# KEYS: the retention set, rq job, record, ended list, RQ's results, events, the marker, then the sets to drop
# the id from (listing indexes, RQ's registries). ARGV: job id, unix now, grace seconds.
# Returns 'live' or 'expired'.
_EXPIRE_SCRIPT = """
local status = redis.call('HGET', KEYS[2], 'status')
if status and status ~= 'finished' and status ~= 'failed' and status ~= 'canceled'
    and status ~= 'stopped' then
  redis.call('ZREM', KEYS[1], ARGV[1])
  return 'live'
end
if redis.call('EXISTS', KEYS[3]) == 1 and tonumber(ARGV[3]) > 0 then
  local owner = redis.call('HGET', KEYS[3], 'owner')
  redis.call('DEL', KEYS[7])
  redis.call('HSET', KEYS[7], 'expired_at', ARGV[2])
  if owner then redis.call('HSET', KEYS[7], 'owner', owner) end
  redis.call('EXPIRE', KEYS[7], ARGV[3])
end
redis.call('DEL', KEYS[2], KEYS[3], KEYS[4], KEYS[5], KEYS[6])
for i = 8, #KEYS do redis.call('ZREM', KEYS[i], ARGV[1]) end
return 'expired'
"""


@dataclass(frozen=True)
class ExpiredJob:
    """What is left of a swept job for its grace period: who owned it, and when it was swept."""

    owner: str | None
    expired_at: float


def expired_key(job_id: str) -> str:
    return f"{KEY_PREFIX}:expired:{job_id}"


def record_ttl_s(job_ttl_s: int) -> int:
    """The EXPIRE an ended job's records get: a safety net past job_ttl_s, for when no sweep runs."""
    return job_ttl_s + RECORD_TTL_SLACK_S


def parse_expired(raw: Mapping[bytes, bytes]) -> ExpiredJob | None:
    """The expiry marker from its hash as Redis returns it (HGETALL); None when there is none."""
    if not raw:
        return None
    owner = raw.get(RecordField.OWNER.value.encode())
    return ExpiredJob(
        owner=owner.decode() if owner is not None else None,
        expired_at=float(raw.get(MARKER_EXPIRED_AT.encode(), b"0")),
    )


def retain(redis: Redis | Pipeline, job_id: str, job_ttl_s: int, now: float | None = None) -> None:
    """Schedule a job that has just ended for the sweep, and give its records the safety-net TTL.

    For ends that happen outside our Lua scripts (RQ's cleanup failing a lost job); the scripts do
    the same themselves.
    """
    now = time.time() if now is None else now
    redis.zadd(RETENTION_KEY, {job_id: now + job_ttl_s})
    for key in (record_key(job_id), rq_job_key(job_id), Result.get_key(job_id)):
        redis.expire(key, record_ttl_s(job_ttl_s))


def sweep_expired_jobs(
    redis: Redis,
    storage: Storage,
    *,
    grace_s: int,
    delete_outputs: bool = True,
    now: float | None = None,
    batch: int = SWEEP_BATCH,
) -> list[str]:
    """Delete the records and outputs of up to `batch` jobs whose retention has run out.

    Safe to run in many processes at once: each due job is claimed by one of them (for
    SWEEP_LEASE_S), and deleting what is already gone is no error.

    Args:
        redis: the job store.
        storage: where the outputs are.
        grace_s: how long an expired job answers 410 `job_expired` (0: a 404 at once).
        delete_outputs: False leaves the outputs to the store's own expiry (an S3 lifecycle rule).
        now: the unix time to sweep at (tests sweep "later" without waiting).
        batch: the most jobs to claim.

    Returns:
        The ids of the jobs swept by this call. A job whose outputs could not be deleted is logged
        and swept again once its claim lapses; a RedisError is raised.
    """
    now = time.time() if now is None else now
    claimed: list[bytes] = redis.register_script(_CLAIM_SCRIPT)(
        keys=[RETENTION_KEY], args=[now, batch, now + SWEEP_LEASE_S]
    )  # type: ignore[assignment]
    swept = []
    for job_id in (raw.decode() for raw in claimed):
        if not _expire_records(redis, job_id, now, grace_s):
            log.warning("job %s is queued or running again; it is no longer due for deletion", job_id)
            continue
        if delete_outputs and not _delete_outputs(storage, job_id):
            continue  # swept again once the claim lapses
        redis.zrem(RETENTION_KEY, job_id)
        swept.append(job_id)
    if swept:
        log.info("deleted %d expired jobs", len(swept))
    return swept


def delete_job(redis: Redis, storage: Storage, job_id: str, delete_outputs: bool = True) -> bool:
    """Delete an ended job's records and outputs now, as the sweep would at its expiry, without the
    expiry marker: its id is a 404 at once (a client's own deletion, `DELETE /v1/videos/{id}`).

    Returns False (nothing deleted) when the job is queued or running. When its outputs cannot be
    deleted, the records are gone already and the sweep is told to delete the outputs at its next
    pass, as it retries any sweep whose storage call failed.
    """
    now = time.time()
    if not _expire_records(redis, job_id, now, grace_s=0):
        return False
    if delete_outputs and not _delete_outputs(storage, job_id):
        redis.zadd(RETENTION_KEY, {job_id: now})  # the sweep deletes them at its next pass
        return True
    redis.zrem(RETENTION_KEY, job_id)
    return True


def _delete_outputs(storage: Storage, job_id: str) -> bool:
    """Delete a job's outputs; False (logged) when storage failed, for the sweep to try again."""
    try:
        storage.delete_prefix(output_prefix(job_id))
    except RedisError:
        raise
    except Exception:
        log.exception("deleting the outputs of job %s failed; the retention sweep tries again", job_id)
        return False
    return True


def _expire_records(redis: Redis, job_id: str, now: float, grace_s: int) -> bool:
    """Swap the job's records for its expiry marker; False (and nothing deleted) if it is live again."""
    owner, model = redis.hmget(record_key(job_id), [RecordField.OWNER, RecordField.MODEL])  # type: ignore[misc]
    drop_from = [ALL_JOBS_KEY]
    if owner is not None:
        drop_from.append(owner_index_key(owner.decode()))  # type: ignore[union-attr]
    if model is not None:
        queue = queue_name(model.decode())  # type: ignore[union-attr]
        drop_from += [
            registry(queue, connection=redis).key
            for registry in (FinishedJobRegistry, FailedJobRegistry, CanceledJobRegistry)
        ]
    keys = [
        RETENTION_KEY,
        rq_job_key(job_id),
        record_key(job_id),
        ended_key(job_id),
        Result.get_key(job_id),
        events_key(job_id),
        expired_key(job_id),
        *drop_from,
    ]
    outcome = redis.register_script(_EXPIRE_SCRIPT)(keys=keys, args=[job_id, now, grace_s])
    return outcome == b"expired"
