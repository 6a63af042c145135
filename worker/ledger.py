"""A worker's ledger of the jobs it holds: take and hold, progress, and recording how each one ends.

Both batching strategies (worker/static_batching.py, worker/continuous_batching.py) drive jobs
through this one object, so neither needs the Worker: a job is held (heartbeated) from the moment it
is taken until it is released, and its end (stored and completed, failed, or canceled) is recorded
through `settle`, which retries while Redis is down. While jobs sample, the ledger knows which of its
held jobs sample together (`running`): it records each one's batch size for the reapers, and arms the
watchdog's Attempt (worker/watchdog.py), which the heartbeat checks.
"""

import logging
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from functools import partial

import numpy as np
from redis.exceptions import RedisError

from dit_serve.config import DEFAULT_JOB_TIMEOUT_S
from dit_serve.eta import StepStats
from dit_serve.events import PreviewEvent, ProgressEvent
from dit_serve.jobs import STORAGE_FAILED_ERROR, JobError
from dit_serve.reaping import HeldRole
from dit_serve.storage import Storage
from worker.batching import JobTicket, Room
from worker.metrics import WorkerMetrics
from worker.outputs import store_outputs
from worker.previews import Previewer
from worker.queue import JobQueue
from worker.stages import StageTimer
from worker.watchdog import Attempt, ceiling_s

log = logging.getLogger(__name__)

SAMPLING_PROGRESS = 95  # progress when denoising ends; decode, encode and store take the rest
REDIS_RETRY_S = 1.0
SETTLE_RETRY_S = 300.0  # after this long, a finished job is left to the reaper (it reruns)


class JobLedger:
    """The jobs one worker holds, and every operation that changes their state in Redis."""

    def __init__(
        self,
        queue: JobQueue,
        storage: Storage,
        metrics: WorkerMetrics,
        job_timeout_s: float = DEFAULT_JOB_TIMEOUT_S,
    ):
        self.queue = queue
        self.storage = storage
        self.metrics = metrics
        self.job_timeout_s = job_timeout_s
        self.previewer = Previewer()
        self._held: dict[str, JobTicket] = {}
        self._attempt: Attempt | None = None
        self._lock = threading.Lock()

    # -- holding -------------------------------------------------------------------------------------
    def take(
        self, queue: str, room: Room, execution: str, compat: str = "", joining: bool = False
    ) -> list[JobTicket]:
        """Take compatible queued jobs that fit in `room` and hold them (heartbeated until released);
        `joining`: into a batch that has jobs already (solo jobs are left queued, and every job must
        fit; else the first may exceed the room and run alone)."""
        tickets = self.queue.take(queue, room.rows, execution, compat, joining, room.cost)
        self.metrics.taken(tickets)
        with self._lock:
            self._held.update((ticket.job_id, ticket) for ticket in tickets)
        return tickets

    def solo_waiting(self, queue: str) -> bool:
        """Whether the last joining take left a solo job queued (the batch should stop taking jobs)."""
        return self.queue.solo_waiting(queue)

    def held(self) -> list[JobTicket]:
        with self._lock:
            return list(self._held.values())

    def release(self, job_ids: Iterable[str]) -> None:
        """Stop heartbeating these jobs: one not settled by then is reaped and requeued."""
        with self._lock:
            for job_id in job_ids:
                self._held.pop(job_id, None)

    def heartbeat(self) -> None:
        """Push the deadline of every held job forward, except the jobs of an overdue batch."""
        hung = self.overdue()
        self.queue.heartbeat([t for t in self.held() if hung is None or t.job_id not in hung.job_ids])

    # -- sampling and the watchdog -------------------------------------------------------------------
    def running(self, tickets: Sequence[JobTicket]) -> None:
        """These held jobs sample together from now on, and the other held jobs wait.

        Arms the watchdog with their ceiling, and records each held job's batch size, which the
        reapers read if this worker dies (dit_serve/reaping.py). Recording is best effort: a job
        whose size was not recorded counts as waiting, which costs it no retry.
        """
        attempt = Attempt(
            frozenset(ticket.job_id for ticket in tickets),
            ceiling_s([ticket.request for ticket in tickets], self.job_timeout_s),
        )
        with self._lock:
            self._attempt = attempt
            held = list(self._held.values())
        sizes = dict.fromkeys(attempt.job_ids, len(attempt.job_ids))
        try:
            self.queue.mark_running(held, sizes)
        except RedisError as exc:
            log.warning("could not record which jobs sample together: %s", exc)

    def idle(self) -> None:
        """No held job samples now: the watchdog is disarmed."""
        with self._lock:
            self._attempt = None

    def overdue(self) -> Attempt | None:
        """The jobs sampling together past their ceiling, if any."""
        with self._lock:
            attempt = self._attempt
        return attempt if attempt is not None and attempt.overdue() else None

    def time_out(self, hung: Attempt) -> list[tuple[str, str]]:
        """Give back every held job of a worker whose batch hung: a job of the batch that ran alone
        fails `timeout`, the others of the batch are requeued to run alone, and the jobs that only
        waited are requeued as they were. Returns (job id, outcome) for each."""
        held = self.held()
        by_id = {ticket.job_id: ticket for ticket in held}
        roles = {
            job_id: HeldRole.ALONE
            if hung.alone or (job_id in by_id and by_id[job_id].solo)
            else HeldRole.SHARED
            for job_id in hung.job_ids
        }
        return self.queue.give_up(held, roles)

    # -- progress ------------------------------------------------------------------------------------
    def report_sampling(
        self,
        steps_done: dict[str, int],
        steps: int,
        previews: Sequence[PreviewEvent] = (),
        step_s: float | None = None,
    ) -> set[str]:
        """Record each job's denoising progress and publish it, with any previews, to the jobs' event
        streams, and `step_s`, how long the step took, for ETAs; returns the ids of jobs a client
        asked to cancel."""
        progress = [
            ProgressEvent(id=job_id, step=done, steps=steps, percent=SAMPLING_PROGRESS * done // steps)
            for job_id, done in steps_done.items()
        ]
        with self._lock:
            model = next((self._held[job_id].model for job_id in steps_done if job_id in self._held), None)
        stats = (model, StepStats(step_s, len(steps_done))) if model and step_s is not None else None
        return self.queue.report_progress(progress, previews, stats)

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
