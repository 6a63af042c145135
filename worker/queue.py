"""The worker's side of the queue: take a batch of compatible jobs, heartbeat them, settle them.

Built beside RQ's stock worker, which takes one job at a time: a Lua script takes several
compatible jobs atomically from an RQ queue, in the scheduler's order (priority class, then fair
share across API keys: dit_serve/scheduling.py), and marks each one `started` in RQ's own
job hash and StartedJobRegistry (member `<job id>:<execution id>`, score = heartbeat deadline),
exactly where RQ would, so `rq info` counts them and the reapers (dit_serve/reaping.py) can requeue
them. A job marked `solo` (its workers died twice, or it hung a batch) is only taken alone.
"""

import logging
import time
import uuid
from collections.abc import Iterable, Mapping, Sequence

from redis import Redis
from redis.exceptions import RedisError
from rq import Queue
from rq.registry import CanceledJobRegistry, FailedJobRegistry, FinishedJobRegistry, StartedJobRegistry

from dit_serve.contract import SCHEMA_VERSION, JobRequest, JobSchemaError, too_new
from dit_serve.eta import StepStats, record_step
from dit_serve.events import PreviewEvent, ProgressEvent, StartedEvent
from dit_serve.events import append as append_event
from dit_serve.jobs import (
    INVALID_JOB_ERROR,
    JobError,
    OutputRecord,
    RecordField,
    ended_key,
    outputs_json,
    queue_name,
    record_key,
    rq_job_key,
    rq_timestamp,
    wake_key,
)
from dit_serve.queueing import fail_expired_jobs, wake_workers
from dit_serve.reaping import HeldRole, give_up
from dit_serve.retention import RETENTION_KEY, record_ttl_s
from dit_serve.scheduling import DEFAULT_AGING_S, FAIR_TAG_LUA, UNSCHEDULE_LUA, scheduler_keys
from worker.batching import GUIDED_FORWARD_ROWS, JobHandle, JobTicket
from worker.sampling import NO_GUIDANCE_AT_OR_BELOW

log = logging.getLogger(__name__)

LOOKAHEAD = 256  # queued jobs looked at per priority class and take

# Jobs are read in the scheduler's order (dit_serve/scheduling.py): the high, normal and low sets in
# turn, each by fair-share tag. First, low jobs due for promotion move to normal with a fair tag.
# KEYS: queue list, StartedJobRegistry, CanceledJobRegistry, then scheduler_keys(queue): the high,
#       normal and low sets (4-6), tags (7), aging (8); then the retention set (9).
# ARGV: max samples, lookahead, compat ('' = any), RQ now, heartbeat deadline, worker name,
#       execution id, unix now, rq job key prefix, record key prefix, ttl seconds, newest job schema
#       this worker reads, '1' when the jobs join a batch that already has jobs, the records' TTL once
#       ended (dit_serve/retention.py), the most cost units ('' = no bound; worker/batching.py's
#       row_cost, computed here from the stored request). Jobs are taken while they fit in both max
#       samples and max cost; only the first job of a new batch may exceed them (it then runs alone).
#       Returns {taken ids, ids left queued because their schema is
#       newer, ids left queued because their deadline has passed (never started: the reaper fails
#       them), 1 when a compatible solo job was left for a batch of its own}. A solo job is taken only
#       as the first job of a new batch, and then nothing joins it. Each taken job's batch size (for
#       the reapers) is the take's count, or 0 (waiting) when joining.
_TAKE_SCRIPT = (
    UNSCHEDULE_LUA
    + FAIR_TAG_LUA
    + """
local max_samples = tonumber(ARGV[1])
local lookahead = tonumber(ARGV[2])
local compat = ARGV[3]
local max_schema = tonumber(ARGV[12])
local now = tonumber(ARGV[8])
local joining = ARGV[13] == '1'
local max_cost = tonumber(ARGV[15]) or math.huge
local guided_rows = tonumber(ARGV[16])
local no_guidance_at_or_below = tonumber(ARGV[17])
local total = 0
local total_cost = 0
local taken = {}
local too_new = {}
local expired = {}
local alone = false  -- a solo job was taken: nothing else may join it
local solo_left = 0

-- worker/batching.py's row_cost, times the job's rows: pixels x frames x forward rows (2 with CFG).
-- An unreadable request costs nothing here: it is taken, and the worker fails it `invalid_job`.
local function job_cost(rec_key, samples)
  local ok, request = pcall(cjson.decode, redis.call('HGET', rec_key, 'request') or '')
  if not ok or type(request) ~= 'table' then return 0 end
  local forward = (tonumber(request.guidance_scale) or 0) > no_guidance_at_or_below and guided_rows or 1
  local pixels = (tonumber(request.width) or 0) * (tonumber(request.height) or 0)
  return samples * pixels * (tonumber(request.num_frames) or 1) * forward
end

for _, id in ipairs(redis.call('ZRANGEBYSCORE', KEYS[8], '-inf', now, 'LIMIT', 0, lookahead)) do
  redis.call('ZREM', KEYS[8], id)
  if redis.call('ZREM', KEYS[6], id) == 1 then
    local rec = redis.call('HMGET', ARGV[10] .. id, 'owner', 'samples')
    redis.call('ZADD', KEYS[5], fair_tag(KEYS[7], 2, rec[1] or '', tonumber(rec[2] or '1')), id)
  end
end

for class = 1, 3 do
  if total >= max_samples or total_cost >= max_cost or alone then break end
  local entries = redis.call('ZRANGE', KEYS[3 + class], 0, lookahead - 1, 'WITHSCORES')
  for i = 1, #entries, 2 do
    local id, tag = entries[i], tonumber(entries[i + 1])
    local job_key = ARGV[9] .. id
    local rec_key = ARGV[10] .. id
    local status = redis.call('HGET', job_key, 'status')
    if status ~= 'queued' then
      -- Only queued jobs belong in a queue: drop entries of deleted or already started jobs.
      unschedule(3, id)
      redis.call('LREM', KEYS[1], 0, id)
    else
      local rec = redis.call('HMGET', rec_key, 'compat', 'samples', 'cancel', 'schema_version', 'deadline',
        'solo')
      local samples = tonumber(rec[2])
      if (tonumber(rec[4]) or 1) > max_schema then
        -- Written by a newer API: leave it queued for a worker that reads it.
        too_new[#too_new + 1] = id
      elseif rec[5] and tonumber(rec[5]) < now then
        -- Not started by its deadline: it must never start.
        expired[#expired + 1] = id
      elseif rec[3] == '1' then
        unschedule(3, id)
        redis.call('LREM', KEYS[1], 0, id)
        redis.call('HSET', job_key, 'status', 'canceled', 'ended_at', ARGV[4])
        redis.call('ZADD', KEYS[3], now + tonumber(ARGV[11]), id)
        redis.call('ZADD', KEYS[9], now + tonumber(ARGV[11]), id)
        redis.call('HSET', rec_key, 'completed_at', ARGV[8])
        redis.call('EXPIRE', job_key, ARGV[14])
        redis.call('EXPIRE', rec_key, ARGV[14])
      elseif rec[1] and samples and (compat == '' or rec[1] == compat) and rec[6] == '1'
          and (joining or total > 0) then
        solo_left = 1  -- it waits for a batch of its own
      elseif rec[1] and samples and (compat == '' or rec[1] == compat) then
        local cost = job_cost(rec_key, samples)
        -- It must fit in both bounds, but the first job of a new batch, which then runs alone.
        if (total == 0 and not joining)
            or (total + samples <= max_samples and total_cost + cost <= max_cost) then
          compat = rec[1]
          alone = rec[6] == '1'
          unschedule(3, id)
          redis.call('LREM', KEYS[1], 0, id)
          if tag > tonumber(redis.call('HGET', KEYS[7], 'vt:' .. class) or '0') then
            redis.call('HSET', KEYS[7], 'vt:' .. class, tag)
          end
          redis.call('HSET', job_key, 'status', 'started', 'started_at', ARGV[4], 'worker_name', ARGV[6],
            'last_heartbeat', ARGV[4])
          redis.call('ZADD', KEYS[2], ARGV[5], id .. ':' .. ARGV[7])
          redis.call('HSET', rec_key, 'started_at', ARGV[8], 'execution', ARGV[7], 'worker', ARGV[6],
            'progress', 0)
          redis.call('HINCRBY', rec_key, 'attempts', 1)
          taken[#taken + 1] = id
          total = total + samples
          total_cost = total_cost + cost
          if total >= max_samples or total_cost >= max_cost or alone then break end
        end
      end
    end
  end
end
local batch_jobs = joining and 0 or #taken
for _, id in ipairs(taken) do redis.call('HSET', ARGV[10] .. id, 'batch_jobs', batch_jobs) end
return {taken, too_new, expired, solo_left}
"""
)

# Settle a held job: only if it is still started and still ours (a reaped and requeued job is not).
# KEYS: rq job, record, StartedJobRegistry, target registry, the job's ended list, the retention set.
# ARGV: job id, execution id, RQ status, RQ now, expiry (the registries' and the retention set's
# score), unix now, the records' TTL (dit_serve/retention.py), then field/value pairs.
_SETTLE_SCRIPT = """
local status = redis.call('HGET', KEYS[1], 'status')
if status ~= 'started' or redis.call('HGET', KEYS[2], 'execution') ~= ARGV[2] then return 0 end
redis.call('ZREM', KEYS[3], ARGV[1] .. ':' .. ARGV[2])
redis.call('HSET', KEYS[1], 'status', ARGV[3], 'ended_at', ARGV[4])
redis.call('ZADD', KEYS[4], ARGV[5], ARGV[1])
redis.call('ZADD', KEYS[6], ARGV[5], ARGV[1])
redis.call('HSET', KEYS[2], 'completed_at', ARGV[6])
for i = 8, #ARGV, 2 do redis.call('HSET', KEYS[2], ARGV[i], ARGV[i + 1]) end
redis.call('EXPIRE', KEYS[1], ARGV[7])
redis.call('EXPIRE', KEYS[2], ARGV[7])
redis.call('RPUSH', KEYS[5], '1')
redis.call('EXPIRE', KEYS[5], ARGV[7])
return 1
"""


# Record how many jobs the sampling run of each held job has (what the reapers read if the worker
# dies), only where the job is still held by that execution. KEYS: records. ARGV: (execution, count)
# for each record.
_MARK_RUNNING_SCRIPT = """
for i, key in ipairs(KEYS) do
  if redis.call('HGET', key, 'execution') == ARGV[2 * i - 1] then
    redis.call('HSET', key, 'batch_jobs', ARGV[2 * i])
  end
end
"""


def new_execution_id() -> str:
    return uuid.uuid4().hex


class JobQueue:
    """One worker's connection to the model queues it serves."""

    def __init__(
        self,
        redis: Redis,
        queue_names: list[str],
        worker_name: str,
        heartbeat_ttl_s: int,
        ttl_s: int,
        aging_s: float = DEFAULT_AGING_S,
    ):
        self.redis = redis
        self.queues = {name: Queue(name, connection=redis) for name in queue_names}
        self.worker_name = worker_name
        self.heartbeat_ttl_s = heartbeat_ttl_s
        self.ttl_s = ttl_s
        self.aging_s = aging_s  # when a low job it gives back is promoted (dit_serve/scheduling.py)
        self._take = redis.register_script(_TAKE_SCRIPT)
        self._settle = redis.register_script(_SETTLE_SCRIPT)
        self._mark_running = redis.register_script(_MARK_RUNNING_SCRIPT)
        self._told_too_new: set[str] = set()  # jobs already logged as too new, to log each once
        self._solo_left: dict[str, bool] = {}  # per queue: the last joining take left a solo job

    def _started(self, queue: str) -> StartedJobRegistry:
        return StartedJobRegistry(queue, connection=self.redis)

    def take(
        self,
        queue: str,
        max_samples: int,
        execution: str,
        compat: str = "",
        joining: bool = False,
        max_cost: int | None = None,
    ) -> list[JobTicket]:
        """Atomically take compatible queued jobs (up to max_samples outputs and max_cost cost units,
        worker/batching.py) in the scheduler's order: priority class first, then each key's fair-share
        turn (dit_serve/scheduling.py). The first job of a new batch is taken even if it exceeds both.

        With `joining` (the jobs join a batch that has jobs already), solo jobs are left queued, and
        `solo_waiting(queue)` says whether one was. Without it, a solo job is taken only first, alone.
        Jobs written with a newer job schema than this worker's stay queued for a newer worker; a job
        whose stored request cannot be read fails at once with `invalid_job`.
        """
        now = time.time()
        ids, newer, expired, solo_left = self._take(
            keys=[
                self.queues[queue].key,
                self._started(queue).key,
                CanceledJobRegistry(queue, connection=self.redis).key,
                *scheduler_keys(queue),
                RETENTION_KEY,
            ],
            args=[
                max_samples,
                LOOKAHEAD,
                compat,
                rq_timestamp(now),
                now + self.heartbeat_ttl_s,
                self.worker_name,
                execution,
                now,
                rq_job_key(""),
                record_key(""),
                self.ttl_s,
                SCHEMA_VERSION,
                "1" if joining else "0",
                record_ttl_s(self.ttl_s),
                "" if max_cost is None else max_cost,
                GUIDED_FORWARD_ROWS,
                NO_GUIDANCE_AT_OR_BELOW,
            ],
        )
        if joining:
            self._solo_left[queue] = bool(solo_left)
        self._tell_too_new(queue, [job_id.decode() for job_id in newer])
        if expired:
            fail_expired_jobs(self.redis, self.ttl_s)
        if not ids:
            return []
        with self.redis.pipeline() as pipe:
            for job_id in ids:
                pipe.hmget(
                    record_key(job_id.decode()), RecordField.REQUEST, RecordField.CREATED_AT, RecordField.SOLO
                )
            records = pipe.execute()
        tickets = []
        for raw_id, (request, created_at, solo) in zip(ids, records, strict=True):
            handle = JobHandle(raw_id.decode(), queue, execution)
            try:
                parsed = JobRequest.from_json(request or b"")
            except JobSchemaError as exc:
                log.error("job %s cannot be read by this worker: %s", handle.job_id, exc)
                self.fail(handle, INVALID_JOB_ERROR)
                continue
            tickets.append(
                JobTicket(handle.job_id, queue, execution, parsed, float(created_at or 0), solo == b"1")
            )
        self.announce_started(tickets, now)
        return tickets

    def solo_waiting(self, queue: str) -> bool:
        """Whether the last joining take of `queue` left a compatible solo job queued: the running batch
        should take no more, so that the job gets a batch of its own."""
        return self._solo_left.get(queue, False)

    def _tell_too_new(self, queue: str, job_ids: list[str]) -> None:
        """Say once per job why this worker leaves it queued."""
        for job_id in set(job_ids) - self._told_too_new:
            hint = too_new(int(self.redis.hget(record_key(job_id), RecordField.SCHEMA_VERSION) or 0))
            log.warning("job %s on %s left queued for a newer worker: %s", job_id, queue, hint)
        self._told_too_new.update(job_ids)

    def wait_for_work(self, queues: Iterable[str], timeout_s: float) -> None:
        """Block until the API signals a new job on one of `queues`, or timeout_s passes."""
        self.redis.blpop([wake_key(name) for name in queues], timeout=max(timeout_s, 0.001))

    def heartbeat(self, tickets: Iterable[JobTicket]) -> None:
        """Push the heartbeat deadline of every held job forward (only entries still present)."""
        deadline = time.time() + self.heartbeat_ttl_s
        now = rq_timestamp()
        with self.redis.pipeline() as pipe:
            for ticket in tickets:
                pipe.zadd(
                    self._started(ticket.queue).key,
                    {f"{ticket.job_id}:{ticket.execution}": deadline},
                    xx=True,
                )
                pipe.hset(rq_job_key(ticket.job_id), "last_heartbeat", now)
            pipe.execute()

    def mark_running(self, held: Iterable[JobHandle], batch_jobs: Mapping[str, int]) -> None:
        """Record, for each held job, how many jobs its sampling run has (0: none yet, it waits)."""
        held = list(held)
        if held:
            self._mark_running(
                keys=[record_key(ticket.job_id) for ticket in held],
                args=[item for t in held for item in (t.execution, batch_jobs.get(t.job_id, 0))],
            )

    def give_up(self, held: Iterable[JobHandle], roles: Mapping[str, HeldRole]) -> list[tuple[str, str]]:
        """Give back the held jobs of a hung batch (dit_serve/reaping.give_up), and wake the workers for
        the requeued ones; returns (job id, outcome) for each."""
        by_queue: dict[str, list[tuple[str, str, HeldRole]]] = {}
        for ticket in held:
            by_queue.setdefault(ticket.queue, []).append(
                (ticket.job_id, ticket.execution, roles.get(ticket.job_id, HeldRole.WAITING))
            )
        outcomes: list[tuple[str, str]] = []
        for queue, jobs in by_queue.items():
            model = queue.removeprefix(queue_name(""))
            outcomes += give_up(self.redis, queue, model, jobs, self.ttl_s, self.aging_s)
            wake_workers(self.redis, queue)
        return outcomes

    def report_progress(
        self,
        progress: Sequence[ProgressEvent],
        previews: Sequence[PreviewEvent] = (),
        stats: tuple[str, StepStats] | None = None,
    ) -> set[str]:
        """Record each job's progress (its step and percent) and append its progress event and any
        previews to its event stream, and the model's step `stats` (model, stats) for ETAs; returns
        the ids of jobs a client asked to cancel."""
        with self.redis.pipeline() as pipe:
            for event in progress:
                pipe.hset(
                    record_key(event.id),
                    mapping={RecordField.PROGRESS.value: event.percent, RecordField.STEP.value: event.step},
                )
                pipe.hget(record_key(event.id), RecordField.CANCEL.value)
            if stats is not None:
                record_step(pipe, *stats)
            for step_event in progress:
                append_event(pipe, step_event)
            for preview in previews:
                append_event(pipe, preview)
            replies = pipe.execute()
        flags = replies[1 : 2 * len(progress) : 2]  # each job's HGET of its cancel flag
        return {event.id for event, flag in zip(progress, flags, strict=True) if flag == b"1"}

    def announce_started(self, tickets: Sequence[JobTicket], started_at: float) -> None:
        """Append a `started` event to each newly taken job's event stream (best effort), with the
        start time the take wrote in its record."""
        try:
            with self.redis.pipeline() as pipe:
                for ticket in tickets:
                    append_event(pipe, StartedEvent(id=ticket.job_id, started_at=round(started_at, 3)))
                pipe.execute()
        except RedisError as exc:
            log.warning("could not announce started jobs: %s", exc)

    def _settle_job(
        self, ticket: JobHandle, rq_status: str, registry_key: str, fields: dict[str, str]
    ) -> bool:
        now = time.time()
        pairs = [item for pair in fields.items() for item in pair]
        settled = self._settle(
            keys=[
                rq_job_key(ticket.job_id),
                record_key(ticket.job_id),
                self._started(ticket.queue).key,
                registry_key,
                ended_key(ticket.job_id),
                RETENTION_KEY,
            ],
            args=[
                ticket.job_id,
                ticket.execution,
                rq_status,
                rq_timestamp(now),
                now + self.ttl_s,
                now,
                record_ttl_s(self.ttl_s),
                *pairs,
            ],
        )
        return bool(settled)

    def complete(self, ticket: JobHandle, outputs: list[OutputRecord]) -> bool:
        registry = FinishedJobRegistry(ticket.queue, connection=self.redis)
        fields = {RecordField.OUTPUTS.value: outputs_json(outputs), RecordField.PROGRESS.value: "100"}
        return self._settle_job(ticket, "finished", registry.key, fields)

    def fail(self, ticket: JobHandle, error: JobError) -> bool:
        registry = FailedJobRegistry(ticket.queue, connection=self.redis)
        fields = {RecordField.ERROR.value: error.model_dump_json()}
        return self._settle_job(ticket, "failed", registry.key, fields)

    def cancel(self, ticket: JobHandle) -> bool:
        registry = CanceledJobRegistry(ticket.queue, connection=self.redis)
        return self._settle_job(ticket, "canceled", registry.key, {})
