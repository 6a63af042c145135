"""Idempotent submissions: one job per caller, Idempotency-Key and body, for 24 hours by default.

The first request with a key claims it atomically (one Lua script), so of many concurrent identical
requests exactly one creates a job; the others, and later retries, get that job. The same key with a
different body is a conflict. Keys are scoped by caller (the API key's name; "" with auth off).
"""

import hashlib
import re
from dataclasses import dataclass
from enum import StrEnum

from redis import Redis

from dit_serve.jobs import KEY_PREFIX

IDEMPOTENCY_TTL_S = 24 * 3600  # the default of DIT_IDEMPOTENCY_TTL_S
IDEMPOTENCY_HEADER = "Idempotency-Key"
VALID_KEY = re.compile(r"^[\x21-\x7e]{1,255}$")  # 1-255 visible ASCII characters

# KEYS: the claim hash. ARGV: the request's fingerprint, the job id it would create, ttl seconds.
# Returns {outcome, job id}: 'new' (this request creates the job), 'replay' or 'conflict'.
_CLAIM_SCRIPT = """
local claimed = redis.call('HMGET', KEYS[1], 'fingerprint', 'job')
if claimed[1] then
  if claimed[1] == ARGV[1] then return {'replay', claimed[2]} end
  return {'conflict', claimed[2]}
end
redis.call('HSET', KEYS[1], 'fingerprint', ARGV[1], 'job', ARGV[2])
redis.call('EXPIRE', KEYS[1], ARGV[3])
return {'new', ARGV[2]}
"""


class ClaimOutcome(StrEnum):
    NEW = "new"  # this request creates the job
    REPLAY = "replay"  # the same request was accepted before: answer with its job
    CONFLICT = "conflict"  # the key was used with another body


@dataclass(frozen=True)
class Claim:
    outcome: ClaimOutcome
    job_id: str


def claim_key(scope: str, key: str) -> str:
    digest = hashlib.sha256(f"{scope}\0{key}".encode()).hexdigest()
    return f"{KEY_PREFIX}:idempotency:{digest}"


def fingerprint(route: str, canonical_body: str) -> str:
    """What makes two requests "the same": the route and the body as validated."""
    return hashlib.sha256(f"{route}\0{canonical_body}".encode()).hexdigest()


def claim(
    redis: Redis,
    scope: str,
    key: str,
    request_fingerprint: str,
    job_id: str,
    ttl_s: int = IDEMPOTENCY_TTL_S,
) -> Claim:
    """Claim `key` for a new job `job_id` for `ttl_s`, or learn which job it already names."""
    outcome, claimed_job = redis.register_script(_CLAIM_SCRIPT)(
        keys=[claim_key(scope, key)], args=[request_fingerprint, job_id, ttl_s]
    )
    return Claim(ClaimOutcome(outcome.decode()), claimed_job.decode())


def release(redis: Redis, scope: str, key: str) -> None:
    """Forget a claim whose job could not be created, so that a retry can create it."""
    redis.delete(claim_key(scope, key))
