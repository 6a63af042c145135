"""The index behind `GET /v1/jobs`: job ids in sorted sets scored by creation time, newest last.

One set holds every job (`dit:jobs:all`, what admins and an API without auth list) and one per API key
(`dit:jobs:owner:<name>`). The retention sweep (dit_serve/retention.py) drops a job's entries when it
deletes the job, `job_ttl_s` after the job ended. As a backstop, an entry older than that plus
INDEX_SLACK_S (room for jobs that queued and ran long) cannot point at a live record: the enqueue that
adds an entry also drops those and sets the set to expire with its newest job. Entries whose record is
gone otherwise are skipped, and dropped, when a listing meets them.
"""

from collections.abc import Iterator

from redis import Redis
from redis.client import Pipeline

from dit_serve.jobs import KEY_PREFIX, JobRecord

ALL_JOBS_KEY = f"{KEY_PREFIX}:jobs:all"
INDEX_SLACK_S = 24 * 3600
SCAN_CHUNK = 50  # ids read per round trip while a listing looks for matches


class UnknownCursorError(KeyError):
    """The `after` id is not (or no longer) in the listing."""


def owner_index_key(owner: str) -> str:
    return f"{KEY_PREFIX}:jobs:owner:{owner}"


def index_key(owner: str | None) -> str:
    """The set to list: one key's jobs, or every job when `owner` is None."""
    return ALL_JOBS_KEY if owner is None else owner_index_key(owner)


def index_job(pipe: Pipeline, job_id: str, record: JobRecord, ttl_s: int) -> None:
    """Queue the commands that add a new job to the listing (and trim what has expired) on `pipe`."""
    keep_s = ttl_s + INDEX_SLACK_S
    keys = [ALL_JOBS_KEY] + ([owner_index_key(record.owner)] if record.owner is not None else [])
    for key in keys:
        pipe.zadd(key, {job_id: record.created_at})
        pipe.zremrangebyscore(key, "-inf", f"({record.created_at - keep_s}")
        pipe.expire(key, keep_s)


def newest_ids(redis: Redis, key: str, after: str | None = None, oldest_first: bool = False) -> Iterator[str]:
    """The ids in set `key`, newest first (or oldest first), starting after id `after`
    (UnknownCursorError if absent)."""
    rank_of, read = (redis.zrank, redis.zrange) if oldest_first else (redis.zrevrank, redis.zrevrange)
    start = 0
    if after is not None:
        rank = rank_of(key, after)
        if rank is None:
            raise UnknownCursorError(after)
        start = int(rank) + 1  # type: ignore[arg-type]
    while True:
        chunk: list[bytes] = read(key, start, start + SCAN_CHUNK - 1)  # type: ignore[assignment]
        yield from (job_id.decode() for job_id in chunk)
        if len(chunk) < SCAN_CHUNK:
            return
        start += len(chunk)


def forget(redis: Redis, key: str, job_id: str) -> None:
    """Drop an id whose record has expired from set `key`."""
    redis.zrem(key, job_id)
