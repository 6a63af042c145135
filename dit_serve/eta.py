"""A job's ETA (`eta_s` in the job object and the events), from measured step times and the queue.

Workers record, per model, how long their last denoising step took and how many jobs it advanced
(`dit:stats:<model>`, written with each progress report). A running job's ETA is its remaining steps
at the pace it has gone so far; a queued job's is the batches ahead of it (at the measured jobs per
batch), plus its own, each of its steps at the measured step time. It ignores that several workers
may share the queue, so with more than one worker it errs long.

This module is imported by the API, so it must not import torch or the web stack.
"""

import math
from dataclasses import dataclass

from redis import Redis
from redis.client import Pipeline

from dit_serve.jobs import KEY_PREFIX

STATS_TTL_S = 24 * 3600  # a model's stats outlive its last batch by this long
STEP_S, BATCH_JOBS = "step_s", "batch_jobs"


@dataclass(frozen=True)
class StepStats:
    step_s: float  # seconds one denoising step of a batch took
    batch_jobs: int  # jobs that step advanced


def stats_key(model: str) -> str:
    return f"{KEY_PREFIX}:stats:{model}"


def record_step(pipe: Redis | Pipeline, model: str, stats: StepStats) -> None:
    """Queue the write of a model's latest step measurement on `pipe`."""
    pipe.hset(stats_key(model), mapping={STEP_S: repr(stats.step_s), BATCH_JOBS: stats.batch_jobs})
    pipe.expire(stats_key(model), STATS_TTL_S)


def read_stats(redis: Redis, model: str) -> StepStats | None:
    raw = redis.hmget(stats_key(model), [STEP_S, BATCH_JOBS])
    if raw[0] is None or raw[1] is None:
        return None
    return StepStats(float(raw[0]), int(raw[1]))


def running_eta_s(started_at: float | None, step: int, steps: int, now: float) -> float | None:
    """Seconds until a running job's last step, at its pace so far (None before its first step)."""
    if started_at is None or step <= 0:
        return None
    return round(max(0.0, now - started_at) / step * max(0, steps - step), 1)


def queued_eta_s(position: int, steps: int, stats: StepStats | None) -> float | None:
    """Seconds until a queued job's last step: the batches ahead of it and its own."""
    if stats is None:
        return None
    batches = math.floor(position / max(1, stats.batch_jobs)) + 1
    return round(batches * steps * stats.step_s, 1)
