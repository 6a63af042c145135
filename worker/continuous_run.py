"""One continuously batched run in the worker: jobs join at step boundaries and leave when done.

Queue plumbing (take, hold, progress, cancel, settle) is the worker's; the rows are a RunningBatch
(worker/continuous.py). The run lasts while it has rows: after every step it reports progress, drops
canceled jobs, stores the jobs whose rows are all done, and takes compatible queued jobs into the
free rows, unless another of the worker's queues has jobs waiting (then it drains, so that queue
gets its turn) or the worker is stopping.
"""

import logging
import time
from typing import TYPE_CHECKING

import numpy as np

from dit_serve.jobs import SAMPLING_FAILED, JobError
from worker.batching import JobTicket
from worker.continuous import RunningBatch
from worker.queue import new_execution_id
from worker.stages import DECODE

if TYPE_CHECKING:
    from worker.runner import Worker

log = logging.getLogger(__name__)

SAMPLING_PROGRESS = 95  # as in the static path: decode, encode and store take the rest


class ContinuousRun:
    def __init__(self, worker: "Worker", queue: str):
        self.worker = worker
        self.queue_name = queue
        self.model = worker.models[queue]
        self.jobs: dict[str, JobTicket] = {}  # admitted and not yet settled
        self.owners: dict[int, tuple[str, int]] = {}  # row id -> (job id, output index)
        self.pixels: dict[str, dict[int, np.ndarray]] = {}
        self.rows_of: dict[str, list[int]] = {}
        self.batch: RunningBatch | None = None
        self.timer = worker.metrics.timer(self.model.name, self.model.kind)

    def run(self, tickets: list[JobTicket]) -> None:
        request = tickets[0].request
        self.compat = tickets[0].compat
        log.info("continuous batch started: %s", self.compat)
        # Ours from here: a batch that cannot even be set up (say, more steps than the model's schedule
        # has) fails its jobs like any sampling error, rather than ending the worker with them held.
        self.jobs.update((ticket.job_id, ticket) for ticket in tickets)
        try:
            self.batch = RunningBatch(
                self.model,
                int(request["num_inference_steps"]),
                int(request["width"]),
                int(request["height"]),
                int(request.get("num_frames") or 1),
            )
            self._admit(tickets)
            while len(self.batch):
                rows, start = len(self.batch), time.perf_counter()
                self.batch.step()
                self.worker.metrics.stepped(
                    self.model.name, self.model.kind, [rows], self.worker.metrics.waited(start)
                )
                self._report_and_cancel()
                self._finish_done_rows()
                self._join()
        except Exception as exc:
            log.exception("sampling failed in continuous batch %s", self.compat)
            error = JobError(SAMPLING_FAILED, f"sampling failed on worker {self.worker.config.name}: {exc}")
            for ticket in self.jobs.values():
                self.worker.fail(ticket, error)
        finally:
            # Whatever happened, stop heartbeating these jobs: one not settled is reaped and requeued.
            self.worker.release(list(self.jobs))

    def _admit(self, tickets: list[JobTicket]) -> None:
        assert self.batch is not None
        for ticket in tickets:
            rows = ticket.rows()
            ids = self.batch.add(
                [row.condition for row in rows],
                [row.seed for row in rows],
                [row.guidance_scale for row in rows],
            )
            self.owners.update(
                {row_id: (ticket.job_id, row.index) for row_id, row in zip(ids, rows, strict=True)}
            )
            self.jobs[ticket.job_id] = ticket
            self.rows_of[ticket.job_id] = ids
            self.pixels[ticket.job_id] = {}

    def _report_and_cancel(self) -> None:
        assert self.batch is not None
        done = self.batch.steps_done()
        progress = {
            job_id: SAMPLING_PROGRESS * done[rows[0]] // self.batch.steps
            for job_id, rows in self.rows_of.items()
            if rows and rows[0] in done
        }
        asked = self.worker.queue.report_progress(progress)
        for job_id in asked & set(self.jobs):
            rows = self.rows_of.pop(job_id)
            self.batch.drop(rows)
            for row in rows:
                self.owners.pop(row, None)
            self.pixels.pop(job_id, None)
            self.worker.cancel(self.jobs.pop(job_id))
            self.worker.release([job_id])
            log.info("job %s canceled at step %d/%d", job_id, done[rows[0]], self.batch.steps)

    def _finish_done_rows(self) -> None:
        assert self.batch is not None
        finished = self.batch.finished()
        if not finished:
            return
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
            self.worker.store(ticket, pixels, self.timer)
        finally:
            self.worker.release([job_id])

    def _join(self) -> None:
        assert self.batch is not None
        free = self.worker.config.max_batch - len(self.batch)
        if free <= 0 or self.worker.stopping.is_set() or self.worker.other_queues_waiting(self.queue_name):
            return
        tickets = self.worker.queue.take(self.queue_name, free, new_execution_id(), self.compat)
        if tickets:
            self.worker.hold(tickets)
            self._admit(tickets)
