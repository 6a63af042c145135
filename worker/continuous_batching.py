"""Continuous batching: jobs join a running batch at step boundaries and leave when done.

The rows are a RunningBatch (worker/continuous.py); take, hold, progress, cancel and settle go
through the worker's JobLedger. A run lasts while it has rows: after every step it reports progress,
drops canceled jobs, stores the jobs whose rows are all done, and takes compatible queued jobs into
the free rows, unless the worker yields its turn (it is stopping, or another of its queues has jobs
waiting: the run then drains, so that queue gets its turn), or a solo job waits for a batch of its own
(the run drains for it too), or the run holds a solo job (nothing joins it).

A step that raises ends the run: its jobs are handed to static batching's retry_apart, which tries
them again in smaller static batches (halves after an out-of-memory error, else one by one), so only a
job that fails alone fails `sampling_failed`.
"""

import logging
import time

import numpy as np

from dit_serve.contract import JobRequest
from dit_serve.events import PreviewEvent
from models.loading import LoadedModel
from worker.batching import JobTicket
from worker.continuous import RunningBatch
from worker.interleave import Interleaver, no_interleaving
from worker.ledger import JobLedger
from worker.lora import adapter_bank
from worker.previews import previews_due
from worker.queue import new_execution_id
from worker.stages import DECODE
from worker.static_batching import StaticBatching, with_adapters
from worker.strategy import BatchLimits, YieldTurn

log = logging.getLogger(__name__)


class ContinuousBatching:
    """Step-level batching for models whose scheduler has a per-row step (DDIM, DPM-Solver++, UniPC)."""

    def __init__(
        self,
        ledger: JobLedger,
        limits: BatchLimits,
        worker_name: str,
        yield_turn: YieldTurn,
        apart: StaticBatching,
        interleaver: Interleaver | None = None,
    ):
        """`apart`: the static batching that tries the jobs of a failed run again in smaller batches;
        `interleaver`: the worker's hook that may run a shorter batch of another queue between two steps
        (worker/interleave.py); none: never."""
        self.ledger = ledger
        self.limits = limits
        self.worker_name = worker_name
        self.yield_turn = yield_turn
        self.apart = apart
        self.interleaver = interleaver or no_interleaving()

    def run(self, queue: str, model: LoadedModel, tickets: list[JobTicket]) -> None:
        ContinuousRun(self, queue, model).run(tickets)


class ContinuousRun:
    """One continuously batched run over one queue, from its first jobs until it has no rows left."""

    def __init__(self, strategy: ContinuousBatching, queue: str, model: LoadedModel):
        self.ledger = strategy.ledger
        self.strategy = strategy
        self.queue_name = queue
        self.model = model
        self.jobs: dict[str, JobTicket] = {}  # admitted and not yet settled
        self.owners: dict[int, tuple[str, int]] = {}  # row id -> (job id, output index)
        self.pixels: dict[str, dict[int, np.ndarray]] = {}
        self.rows_of: dict[str, list[int]] = {}
        self.batch: RunningBatch | None = None
        self.timer = self.ledger.metrics.timer(model.name, model.kind)
        self.sampling: frozenset[str] = frozenset()  # the jobs last told to the ledger as running
        self.draining = False  # a solo job waits for a batch of its own: take no more jobs

    def run(self, tickets: list[JobTicket]) -> None:
        request = tickets[0].request
        self.compat = request.compat
        metrics = self.ledger.metrics
        log.info("continuous batch started: %s", self.compat)
        # Ours from here: a batch that cannot even be set up (say, more steps than the model's schedule
        # has) fails its jobs like any sampling error, rather than ending the worker with them held.
        self.jobs.update((ticket.job_id, ticket) for ticket in tickets)
        try:
            self.batch = RunningBatch(
                self.model,
                request.num_inference_steps,
                request.width,
                request.height,
                request.num_frames,
                adapter_bank(self.model.transformer, self.ledger.storage),
            )
            self._admit(tickets)
            self._tell_running()
            while len(self.batch):
                rows, start = len(self.batch), time.perf_counter()
                self.batch.step()
                step_s = metrics.waited(start)
                metrics.stepped(self.model.name, self.model.kind, [rows], step_s)
                self._report_and_cancel(self._previews(), step_s)
                self._finish_done_rows()
                self._interleave(request, step_s)
                self._join()
                self._tell_running()
        except Exception as exc:
            self.ledger.idle()
            if len(self.jobs) > 1:
                log.warning(
                    "a step of continuous batch %s failed on worker %s with jobs %s: running them "
                    "again in static batches",
                    self.compat,
                    self.strategy.worker_name,
                    ", ".join(self.jobs),
                )
            # Rows start over: a job's output does not depend on how it was batched.
            self.strategy.apart.retry_apart(self.model, list(self.jobs.values()), exc)
        finally:
            self.ledger.idle()
            # Whatever happened, stop heartbeating these jobs: one not settled is reaped and requeued.
            self.ledger.release(list(self.jobs))

    def _tell_running(self) -> None:
        """Tell the ledger which jobs sample together when that changed (a join, a cancel, an end):
        the watchdog's ceiling starts again from here, with the new jobs' cost."""
        if frozenset(self.jobs) != self.sampling:
            self.sampling = frozenset(self.jobs)
            if self.jobs:
                self.ledger.running(list(self.jobs.values()))

    def _admit(self, tickets: list[JobTicket]) -> None:
        assert self.batch is not None
        # The run's own before any row is added: if adding fails, the run fails them with the rest.
        self.jobs.update((ticket.job_id, ticket) for ticket in tickets)
        if self.batch.bank is not None and any(ticket.request.loras for ticket in tickets):
            admitted = with_adapters(self.batch.bank, tickets, self.ledger)
            refused = [ticket.job_id for ticket in tickets if ticket not in admitted]
            for job_id in refused:  # failed already: not the run's to settle
                del self.jobs[job_id]
            self.ledger.release(refused)
            tickets = admitted
        for ticket in tickets:
            rows = ticket.rows()
            ids = self.batch.add(
                [row.condition for row in rows],
                [row.seed for row in rows],
                [row.guidance_scale for row in rows],
                [row.cache for row in rows],
                [row.loras for row in rows],
            )
            self.owners.update(
                {row_id: (ticket.job_id, row.index) for row_id, row in zip(ids, rows, strict=True)}
            )
            self.jobs[ticket.job_id] = ticket
            self.rows_of[ticket.job_id] = ids
            self.pixels[ticket.job_id] = {}

    def _previews(self) -> list[PreviewEvent]:
        """Previews of the jobs that want one after the step just taken (rows step together per job)."""
        assert self.batch is not None
        done = self.batch.steps_done()
        events: list[PreviewEvent] = []
        for job_id, rows in self.rows_of.items():
            request = self.jobs[job_id].request
            if rows and previews_due(request, done[rows[0]], self.batch.steps):
                outputs = [self.owners[row] for row in rows]
                clean = self.batch.clean_of(rows)
                events += self.ledger.previewer.events(self.model, outputs, clean, done[rows[0]], request)
        return events

    def _report_and_cancel(self, previews: list[PreviewEvent], step_s: float) -> None:
        assert self.batch is not None
        done = self.batch.steps_done()
        steps_done = {
            job_id: done[rows[0]] for job_id, rows in self.rows_of.items() if rows and rows[0] in done
        }
        asked = self.ledger.report_sampling(steps_done, self.batch.steps, previews, step_s)
        for job_id in asked & set(self.jobs):
            rows = self.rows_of.pop(job_id)
            self.batch.drop(rows)
            for row in rows:
                self.owners.pop(row, None)
            self.pixels.pop(job_id, None)
            self.ledger.cancel(self.jobs.pop(job_id))
            self.ledger.release([job_id])
            log.info("job %s canceled at step %d/%d", job_id, done[rows[0]], self.batch.steps)

    def _finish_done_rows(self) -> None:
        assert self.batch is not None
        finished = self.batch.finished()
        if not finished:
            return
        if self.batch.caches:
            self.ledger.metrics.cached(
                self.model.name, self.model.kind, *self.batch.caches.step_counts(finished)
            )
        with self.timer(DECODE):
            decoded = self.model.decode(self.batch.pop(finished)).numpy()
        for row_id, array in zip(finished, decoded, strict=True):
            job_id, index = self.owners.pop(row_id)
            self.pixels[job_id][index] = array
            ticket = self.jobs[job_id]
            if len(self.pixels[job_id]) == ticket.num_outputs:
                outputs = self.pixels.pop(job_id)
                self._store(ticket, [outputs[k] for k in range(ticket.num_outputs)])

    def _store(self, ticket: JobTicket, pixels: list[np.ndarray]) -> None:
        job_id = ticket.job_id
        del self.jobs[job_id], self.rows_of[job_id]
        try:
            self.ledger.store(ticket, pixels, self.timer)
        finally:
            self.ledger.release([job_id])

    def _interleave(self, request: JobRequest, step_s: float) -> None:
        """Let the worker run a shorter batch of another queue before the next step (worker/interleave.py)."""
        assert self.batch is not None
        remaining = max((self.batch.steps - done for done in self.batch.steps_done().values()), default=0)
        if self.strategy.interleaver.turn(self.queue_name, request, remaining, step_s):
            self.sampling = frozenset()  # resumed: tell the ledger again, which re-arms the watchdog

    def _join(self) -> None:
        assert self.batch is not None
        alone = any(ticket.solo for ticket in self.jobs.values())
        # Every held job's rows are in the batch until it is stored, so the room is the limits less them.
        room = self.strategy.limits.room.after(self.jobs.values())
        if room.full or alone or self.draining or self.strategy.yield_turn(self.queue_name):
            return
        tickets = self.ledger.take(self.queue_name, room, new_execution_id(), self.compat, joining=True)
        self.draining = self.ledger.solo_waiting(self.queue_name)
        if tickets:
            self._admit(tickets)
