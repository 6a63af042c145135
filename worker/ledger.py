"""A worker's ledger of the jobs it holds: take and hold, progress, and recording how each one ends.

Both batching strategies (worker/static_batching.py, worker/continuous_batching.py) drive jobs
through this one object, so neither needs the Worker: a job is held (heartbeated) from the moment it
is taken until it is released, and its end (stored and completed, failed, or canceled) is recorded
through `settle`, which retries while Redis is down.
"""

import logging
import threading
import time
from collections.abc import Callable, Iterable
from functools import partial

import numpy as np
from redis.exceptions import RedisError

from dit_serve.jobs import STORAGE_FAILED_ERROR, JobError
from dit_serve.storage import Storage
from worker.batching import JobTicket
from worker.metrics import WorkerMetrics
from worker.outputs import store_outputs
from worker.queue import JobQueue
from worker.stages import StageTimer

log = logging.getLogger(__name__)

SAMPLING_PROGRESS = 95  # progress when denoising ends; decode, encode and store take the rest
REDIS_RETRY_S = 1.0
SETTLE_RETRY_S = 300.0  # after this long, a finished job is left to the reaper (it reruns)


class JobLedger:
    """The jobs one worker holds, and every operation that changes their state in Redis."""

    def __init__(self, queue: JobQueue, storage: Storage, metrics: WorkerMetrics):
        self.queue = queue
        self.storage = storage
        self.metrics = metrics
        self._held: dict[str, JobTicket] = {}
        self._lock = threading.Lock()

    # -- holding -------------------------------------------------------------------------------------
    def take(self, queue: str, max_samples: int, execution: str, compat: str = "") -> list[JobTicket]:
        """Take compatible queued jobs and hold them (heartbeated until released)."""
        tickets = self.queue.take(queue, max_samples, execution, compat)
        self.metrics.taken(tickets)
        with self._lock:
            self._held.update((ticket.job_id, ticket) for ticket in tickets)
        return tickets

    def held(self) -> list[JobTicket]:
        with self._lock:
            return list(self._held.values())

    def release(self, job_ids: Iterable[str]) -> None:
        """Stop heartbeating these jobs: one not settled by then is reaped and requeued."""
        with self._lock:
            for job_id in job_ids:
                self._held.pop(job_id, None)

    def heartbeat(self) -> None:
        self.queue.heartbeat(self.held())

    # -- progress ------------------------------------------------------------------------------------
    def report_sampling(self, steps_done: dict[str, int], steps: int) -> set[str]:
        """Record each job's denoising progress; returns the ids of jobs a client asked to cancel."""
        return self.queue.report_progress(
            {job_id: SAMPLING_PROGRESS * done // steps for job_id, done in steps_done.items()}
        )

    # -- how a job ends ------------------------------------------------------------------------------
    def store(self, ticket: JobTicket, pixels: list[np.ndarray], timer: StageTimer) -> None:
        """Encode and store a job's outputs, then record it completed (or failed, if storing failed)."""
        try:
            outputs = store_outputs(self.storage, ticket, pixels, timer)
        except Exception:
            log.exception("storing outputs of job %s failed", ticket.job_id)
            self.fail(ticket, STORAGE_FAILED_ERROR)
            return
        if self.settle(partial(self.queue.complete, ticket, outputs)):
            self.metrics.ended(ticket, "completed", outputs=outputs)
        else:
            log.warning("job %s was taken back from this worker before it finished", ticket.job_id)

    def fail(self, ticket: JobTicket, error: JobError) -> None:
        if self.settle(partial(self.queue.fail, ticket, error)):
            self.metrics.ended(ticket, "failed", error.code)

    def cancel(self, ticket: JobTicket) -> None:
        if self.settle(partial(self.queue.cancel, ticket)):
            self.metrics.ended(ticket, "canceled")

    def settle(self, settle: Callable[[], bool]) -> bool:
        """Record a job's end, retrying while Redis is down (the heartbeat keeps the job ours meanwhile)."""
        deadline = time.monotonic() + SETTLE_RETRY_S
        while True:
            try:
                return settle()
            except RedisError as exc:
                if time.monotonic() > deadline:
                    log.error("giving up recording a job's end after %.0f s: %s", SETTLE_RETRY_S, exc)
                    return False
                log.warning("redis unavailable while recording a job's end (%s); retrying", exc)
                time.sleep(REDIS_RETRY_S)
