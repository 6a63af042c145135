"""Which queued job goes next: priority classes, aging, and fair share across API keys.

Each model's RQ queue (the list `rq info` counts) holds every queued job, as before. Beside it the
scheduler keeps, per queue:

- `dit:sched:<queue>:<class>`: one sorted set per priority class (high, normal, low), of the queued
  job ids scored by a virtual finish tag. Workers take jobs in class order, and within a class in
  tag order (worker/queue.py's take script).
- `dit:sched:<queue>:tags`: the class's virtual time (`vt:<class>`, the tag of the last job taken)
  and each key's last tag (`last:<class>:<owner>`).
- `dit:sched:<queue>:aging`: low jobs scored by when they are due for promotion to normal.

Fair share is weighted fair queuing over API keys, weighted by outputs. A job of n outputs from key
k gets the tag max(vt, last[k]) + n. A key that floods the queue gets tags far in the future, while a
key that sends one job gets a tag one job after the virtual time, so it is taken within about one
batch however many jobs the flooding key has queued. This is what deficit round robin across keys
gives, with each job's turn fixed when it is queued (one ZADD, O(log n)), so a take reads jobs in
turn order rather than scanning the whole queue. A key that was idle does not bank credit: its tags
start at the virtual time.

Only the API queues jobs here, and the reapers (dit_serve/reaping.py), which put a job whose worker
died back at the front of its class in the same script that requeues it. A job that comes back to the
RQ list any other way (RQ's own cleanup, run by `rq info`, requeues a job whose worker died) is put
back at the front of its class by `reconcile`, which the reaper runs on every pass.
"""

import time

from redis import Redis
from redis.client import Pipeline

from dit_serve.contract import Priority
from dit_serve.jobs import KEY_PREFIX, RecordField, record_key, rq_job_key

ANONYMOUS_OWNER = ""  # the fair-share owner of jobs sent with auth off: one owner, so first in, first out
DEFAULT_AGING_S = 120.0  # a low-priority job waiting longer than this is taken as a normal one
RECONCILE_SCAN = 1000  # queued jobs looked at per queue and reaping pass
RECONCILE_GRACE_S = 5.0  # a job younger than this may be between its RQ enqueue and its scheduling


def class_key(queue: str, priority: Priority) -> str:
    return f"{KEY_PREFIX}:sched:{queue}:{priority.value}"


def tags_key(queue: str) -> str:
    return f"{KEY_PREFIX}:sched:{queue}:tags"


def aging_key(queue: str) -> str:
    return f"{KEY_PREFIX}:sched:{queue}:aging"


def scheduler_keys(queue: str) -> list[str]:
    """The Lua scripts' scheduler KEYS, in this order: the high, normal and low sets, tags, aging."""
    return [*(class_key(queue, priority) for priority in Priority), tags_key(queue), aging_key(queue)]


# Lua shared by the scripts that schedule jobs: fair_tag(tags key, class index, owner, outputs) is the
# next tag of `owner` in the class, recorded as its last.
FAIR_TAG_LUA = """
local function fair_tag(tags, class, owner, outputs)
  local vt = tonumber(redis.call('HGET', tags, 'vt:' .. class) or '0')
  local last_field = 'last:' .. class .. ':' .. owner
  local tag = math.max(vt, tonumber(redis.call('HGET', tags, last_field) or '0')) + outputs
  redis.call('HSET', tags, last_field, tag)
  return tag
end
"""

# Put a queued job in its class, once. KEYS: scheduler_keys(queue).
# ARGV: job id, class index (1 high, 2 normal, 3 low), owner, outputs, promotion time ('' none), front
# ('1': at the class's virtual time, ahead of every later tag: a job that has waited already).
_SCHEDULE_SCRIPT = (
    FAIR_TAG_LUA
    + """
for i = 1, 3 do
  if redis.call('ZSCORE', KEYS[i], ARGV[1]) then return 0 end
end
local class = tonumber(ARGV[2])
local tag
if ARGV[6] == '1' then
  tag = tonumber(redis.call('HGET', KEYS[4], 'vt:' .. class) or '0')
else
  tag = fair_tag(KEYS[4], class, ARGV[3], tonumber(ARGV[4]))
end
redis.call('ZADD', KEYS[class], tag, ARGV[1])
if ARGV[5] ~= '' then redis.call('ZADD', KEYS[5], tonumber(ARGV[5]), ARGV[1]) end
return 1
"""
)

# The Lua function worker/queue.py's take script and the scripts that end queued jobs share:
# unschedule(keys offset, job id) takes a job out of every scheduler set (KEYS[offset + 1..5]).
UNSCHEDULE_LUA = """
local function unschedule(offset, id)
  for i = 1, 3 do redis.call('ZREM', KEYS[offset + i], id) end
  redis.call('ZREM', KEYS[offset + 5], id)
end
"""


# Lua shared by the scripts that put a job back in its queue (dit_serve/reaping.py):
# schedule_front(keys offset, job id, priority, created_at, aging_s) puts it at the front of its class
# (KEYS[offset + 1..5] are scheduler_keys(queue)), as reconcile would, unless it is there already.
SCHEDULE_FRONT_LUA = (
    "local CLASS_INDEX = {"
    + ", ".join(f"{priority.value} = {priority.rank + 1}" for priority in Priority)
    + "}\n"
    + f"""
local function schedule_front(offset, id, priority, created_at, aging_s)
  for i = 1, 3 do
    if redis.call('ZSCORE', KEYS[offset + i], id) then return end
  end
  local class = CLASS_INDEX[priority or ''] or {Priority.NORMAL.rank + 1}
  local tag = tonumber(redis.call('HGET', KEYS[offset + 4], 'vt:' .. class) or '0')
  redis.call('ZADD', KEYS[offset + class], tag, id)
  if class == {Priority.LOW.rank + 1} and aging_s > 0 then
    redis.call('ZADD', KEYS[offset + 5], (tonumber(created_at) or 0) + aging_s, id)
  end
end
"""
)


def schedule_job(
    redis: Redis | Pipeline,
    queue: str,
    job_id: str,
    *,
    priority: Priority,
    owner: str | None,
    outputs: int,
    promote_at: float | None = None,
    front: bool = False,
) -> None:
    """Give a queued job its turn: its class, and its fair-share tag among its owner's jobs.

    A low job with `promote_at` counts as normal from then on (aging).
    """
    redis.register_script(_SCHEDULE_SCRIPT)(
        keys=scheduler_keys(queue),
        args=[
            job_id,
            priority.rank + 1,
            owner or ANONYMOUS_OWNER,
            outputs,
            repr(promote_at) if promote_at is not None and priority is Priority.LOW else "",
            "1" if front else "0",
        ],
    )


def promote_at(priority: Priority, created_at: float, aging_s: float) -> float | None:
    """When a job of `priority` is promoted a class (only low jobs are: high is granted per key)."""
    return created_at + aging_s if priority is Priority.LOW and aging_s > 0 else None


def queue_rank(redis: Redis, queue: str, job_id: str) -> int | None:
    """How many queued jobs go before this one (0: next), or None when it is not scheduled."""
    with redis.pipeline() as pipe:
        for priority in Priority:
            pipe.zrank(class_key(queue, priority), job_id)
            pipe.zcard(class_key(queue, priority))
        replies = pipe.execute()
    ahead = 0
    for rank, size in zip(replies[0::2], replies[1::2], strict=True):
        if rank is not None:
            return ahead + int(rank)
        ahead += int(size)
    return None


def reconcile(redis: Redis, queue_key: str, queue: str, aging_s: float) -> int:
    """Schedule, at the front of their class, queued jobs that are in the RQ list but not scheduled.

    RQ's cleanup puts a job whose worker died back on the list; a crash between an API's RQ enqueue and
    its scheduling leaves a job there too. Entries of jobs that are no longer queued are dropped.
    Returns how many jobs were scheduled.
    """
    keys = scheduler_keys(queue)
    with redis.pipeline() as pipe:
        pipe.llen(queue_key)
        for key in keys[:3]:
            pipe.zcard(key)
        listed, *scheduled = pipe.execute()
    if int(listed) <= sum(int(count) for count in scheduled):
        return 0
    job_ids = [raw_id.decode() for raw_id in redis.lrange(queue_key, 0, RECONCILE_SCAN - 1)]  # type: ignore[union-attr]
    fields = [
        RecordField.PRIORITY,
        RecordField.OWNER,
        RecordField.SAMPLES,
        RecordField.CREATED_AT,
        RecordField.ATTEMPTS,
    ]
    with redis.pipeline() as pipe:
        for job_id in job_ids:
            for key in keys[:3]:
                pipe.zscore(key, job_id)
            pipe.hget(rq_job_key(job_id), "status")
            pipe.hmget(record_key(job_id), fields)
        replies = pipe.execute()
    found = 0
    now = time.time()
    for index, job_id in enumerate(job_ids):
        *scores, status, (priority, owner, samples, created_at, attempts) = replies[5 * index : 5 * index + 5]
        if any(score is not None for score in scores):
            continue
        if status != b"queued" or samples is None:
            redis.lrem(queue_key, 0, job_id)  # a job that is no longer queued does not belong here
            continue
        created = float(created_at or 0)
        if not int(attempts or 0) and created > now - RECONCILE_GRACE_S:
            continue  # never started, and so new that its API may be scheduling it right now
        klass = Priority(priority.decode()) if priority else Priority.NORMAL
        schedule_job(
            redis,
            queue,
            job_id,
            priority=klass,
            owner=owner.decode() if owner else None,
            outputs=int(samples),
            promote_at=promote_at(klass, created, aging_s),
            front=True,
        )
        found += 1
    return found
