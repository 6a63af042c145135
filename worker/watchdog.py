"""Hung work: a ceiling on how long a batch may sample, scaled by what it asks for.

A batch's ceiling is DIT_JOB_TIMEOUT_S times its cost relative to the reference job's, and never less
than DIT_JOB_TIMEOUT_S. A job's cost is steps × pixels × frames × outputs; the reference job is one
512×512 image of 50 steps (REFERENCE_COST). The ledger (worker/ledger.py) arms an Attempt when a batch
starts sampling; the worker's heartbeat thread stops heartbeating an overdue one, gives its jobs back
and exits (worker/runner.py), so that a supervisor restarts the worker.
"""

import time
from collections.abc import Iterable
from dataclasses import dataclass, field

from dit_serve.contract import JobRequest

REFERENCE_STEPS = 50
REFERENCE_WIDTH = REFERENCE_HEIGHT = 512
REFERENCE_COST = REFERENCE_STEPS * REFERENCE_WIDTH * REFERENCE_HEIGHT  # one frame, one output


def job_cost(request: JobRequest) -> int:
    """Denoising work a job asks for: steps × pixels × frames × outputs."""
    return request.num_inference_steps * request.width * request.height * request.num_frames * request.n


def ceiling_s(requests: Iterable[JobRequest], job_timeout_s: float) -> float:
    """How long a batch of these jobs may sample: job_timeout_s per reference job's cost, at least once."""
    return job_timeout_s * max(1.0, sum(job_cost(request) for request in requests) / REFERENCE_COST)


@dataclass(frozen=True)
class Attempt:
    """Jobs sampling together since `started` (monotonic seconds), and how long they may take."""

    job_ids: frozenset[str]
    ceiling_s: float
    started: float = field(default_factory=time.monotonic)

    def overdue(self, now: float | None = None) -> bool:
        return (time.monotonic() if now is None else now) - self.started > self.ceiling_s

    @property
    def alone(self) -> bool:
        return len(self.job_ids) == 1
