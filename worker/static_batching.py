"""Static batching: fill a batch with compatible jobs while they arrive (a bounded window), then run it.

A batch whose sampling raises is tried again in smaller batches (worker/isolation.py), so that only a
job that fails alone ends `sampling_failed`. Continuous batching hands the jobs of a failed run here.
"""

import logging
import time
from collections import defaultdict
from collections.abc import Callable, Sequence

import numpy as np
import torch
from redis.exceptions import RedisError

from dit_serve.events import PreviewEvent
from dit_serve.jobs import LORA_UNAVAILABLE_ERROR, SAMPLING_FAILED_ERROR
from models.loading import LoadedModel
from worker.batching import Batch, JobTicket
from worker.fill_window import FillWindow
from worker.interleave import Interleaver, no_interleaving
from worker.isolation import free_device_memory, is_out_of_memory, retry_groups
from worker.ledger import JobLedger
from worker.lora import AdapterBank, LoraUnavailable, adapter_bank, row_adapters
from worker.metrics import WorkerMetrics
from worker.previews import previews_due
from worker.sampling import generate
from worker.stages import SAMPLING
from worker.step_cache import RowCaches
from worker.strategy import BatchLimits

log = logging.getLogger(__name__)

FILL_POLL_S = 0.002  # while filling a batch, how often to look for more compatible jobs


class StaticBatching:
    """Compatible jobs share one denoising loop; jobs that arrive during it wait for the next."""

    def __init__(
        self,
        ledger: JobLedger,
        limits: BatchLimits,
        worker_name: str,
        interleaver: Interleaver | None = None,
    ):
        """`interleaver`: the worker's step-boundary hook that may run a shorter batch of another queue
        between two steps (worker/interleave.py); none: never."""
        self.ledger = ledger
        self.metrics: WorkerMetrics = ledger.metrics
        self.limits = limits
        self.worker_name = worker_name
        self.interleaver = interleaver or no_interleaving()

    def run(self, queue: str, model: LoadedModel, tickets: list[JobTicket]) -> None:
        # A solo job (dit_serve/reaping.py) runs alone: nothing is added to its batch.
        batch = Batch.from_tickets(tickets if tickets[0].solo else self._fill(queue, tickets))
        log.info("batch of %d outputs from %d jobs: %s", len(batch), len(batch.jobs), batch.compat)
        try:
            self.finish(model, list(batch.jobs.values()))
        finally:
            self.ledger.release(batch.jobs)

    def _fill(self, queue: str, tickets: list[JobTicket]) -> list[JobTicket]:
        """Compatible jobs up to the batch limits, while the fill window is open (worker/fill_window.py)."""
        tickets = list(tickets)
        limits = self.limits
        room = limits.room.after(tickets)
        execution = tickets[0].execution
        window = FillWindow(limits.max_wait_ms, limits.gap_ms, limits.max_fill_ms)
        while not room.full and (remaining := window.remaining_s()) > 0:
            try:
                more = self.ledger.take(queue, room, execution, tickets[0].compat, joining=True)
            except RedisError as exc:
                log.warning(
                    "redis failed while filling a batch (%s); running the %d taken", exc, len(tickets)
                )
                break
            if not more:
                # A short sleep, not a blocking pop: Redis times blocked clients out in 100 ms
                # ticks (hz 10), so a 20 ms BLPOP waits about 100 ms.
                time.sleep(min(FILL_POLL_S, remaining))
                continue
            window.arrived()
            tickets += more
            room = room.after(more)
        return tickets

    def finish(self, model: LoadedModel, tickets: list[JobTicket]) -> None:
        """Sample these held, compatible jobs as one batch and store each one's outputs.

        A job whose LoRA adapter cannot be loaded fails `lora_unavailable` first, alone. If sampling
        raises, the jobs (but those canceled meanwhile) are tried again apart: in halves
        first after an out-of-memory error, else one by one; a job that fails alone fails
        `sampling_failed`. Each try is one Attempt for the watchdog.
        """
        if any(ticket.request.loras for ticket in tickets):
            bank = adapter_bank(model.transformer, self.ledger.storage)
            tickets = with_adapters(bank, tickets, self.ledger)
            if not tickets:
                return
        batch = Batch.from_tickets(tickets)
        canceled: set[str] = set()
        self.ledger.running(tickets)
        try:
            pixels = self._sample(model, batch, canceled)
        except Exception as exc:
            self.ledger.idle()
            self.retry_apart(model, [ticket for ticket in tickets if ticket.job_id not in canceled], exc)
            return
        self.ledger.idle()
        timer = self.metrics.timer(model.name, model.kind)
        for job_id, ticket in batch.jobs.items():
            if job_id not in canceled:
                self.ledger.store(ticket, pixels[job_id], timer)

    def retry_apart(self, model: LoadedModel, tickets: list[JobTicket], exc: Exception) -> None:
        """After a batch of these held jobs raised `exc`: fail a job that ran alone, else try again apart."""
        jobs = ", ".join(ticket.job_id for ticket in tickets)
        compat = tickets[0].compat if tickets else ""
        if len(tickets) <= 1:
            log.error(
                "sampling failed for batch %s on worker %s, jobs %s",
                compat,
                self.worker_name,
                jobs,
                exc_info=exc,
            )
            error = LORA_UNAVAILABLE_ERROR if isinstance(exc, LoraUnavailable) else SAMPLING_FAILED_ERROR
            for ticket in tickets:
                self.ledger.fail(ticket, error)
            return
        groups = retry_groups(tickets, exc)
        log.warning(
            "sampling failed for a batch of %d jobs (%s) on worker %s, jobs %s: trying them again as %s",
            len(tickets),
            "out of memory" if is_out_of_memory(exc) else "error",
            self.worker_name,
            jobs,
            " + ".join(f"{len(group)} job{'s' if len(group) > 1 else ''}" for group in groups),
            exc_info=exc,
        )
        free_device_memory(exc)
        for group in groups:
            self.finish(model, group)

    def _sample(self, model: LoadedModel, batch: Batch, canceled: set[str]) -> dict[str, list[np.ndarray]]:
        """Sample every row of the batch; returns each job's pixels, and adds to `canceled` the jobs
        canceled on the way (settled already, even if sampling then raises)."""
        request = batch.first.request
        rows_per_step: list[int] = []
        previews: list[PreviewEvent] = []  # made by on_clean, sent by the on_step that follows
        last_step_at = [time.perf_counter()]  # when the previous step ended

        def on_clean(done: int, rows: torch.Tensor, clean: Callable[[], torch.Tensor]) -> None:
            due = [
                position
                for position, row in enumerate(rows.tolist())
                if previews_due(batch.jobs[batch.rows[row].job_id].request, done, request.num_inference_steps)
            ]
            if due:
                outputs = [(batch.rows[row].job_id, batch.rows[row].index) for row in rows[due].tolist()]
                previews.extend(self.ledger.previewer.events(model, outputs, clean()[due], done, request))

        def on_step(done: int, total: int, rows: torch.Tensor) -> torch.Tensor | None:
            live = [batch.rows[i].job_id for i in rows.tolist()]
            rows_per_step.append(len(live))
            sent, previews[:] = list(previews), []
            now = time.perf_counter()
            step_s = now - last_step_at[0] if done > 1 else None  # the first step's includes set-up
            last_step_at[0] = now
            try:
                asked = self.ledger.report_sampling(dict.fromkeys(live, done), total, sent, step_s)
            except RedisError as exc:
                log.warning("progress report failed: %s", exc)
                return None
            for job_id in asked - canceled:
                self.ledger.cancel(batch.jobs[job_id])
                canceled.add(job_id)
                log.info("job %s canceled at step %d/%d", job_id, done, total)
            self.ledger.release(asked)
            going = [ticket for job_id, ticket in batch.jobs.items() if job_id not in canceled]
            if going and self.interleaver.turn(going[0].queue, request, total - done, step_s):
                self.ledger.running(going)  # resumed: the watchdog's ceiling starts again
                last_step_at[0] = time.perf_counter()
            return torch.tensor([job_id not in canceled for job_id in live]) if asked else None

        spent: dict[str, float] = {}
        caches = RowCaches.of([row.cache for row in batch.rows])
        loras = [row.loras for row in batch.rows]
        adapters = row_adapters(
            adapter_bank(model.transformer, self.ledger.storage) if any(loras) else None, loras
        )
        pixels_out, rows = generate(
            model,
            [row.condition for row in batch.rows],
            [row.seed for row in batch.rows],
            [row.guidance_scale for row in batch.rows],
            request.num_inference_steps,
            request.width,
            request.height,
            request.num_frames,
            on_step=on_step,
            timer=self.metrics.timer(model.name, model.kind, spent, self.interleaver.clock),
            on_clean=on_clean,
            caches=caches,
            adapters=adapters,
        )
        self.metrics.stepped(model.name, model.kind, rows_per_step, spent[SAMPLING])
        if caches:
            self.metrics.cached(model.name, model.kind, *caches.step_counts())
        pixels: dict[str, list[np.ndarray]] = defaultdict(list)
        decoded = pixels_out.numpy()  # (M, H, W, 3) or (M, F, H, W, 3)
        for row_index, array in zip(rows.tolist(), decoded, strict=True):
            pixels[batch.rows[row_index].job_id].append(array)
        return pixels


def with_adapters(bank: AdapterBank, tickets: Sequence[JobTicket], ledger: JobLedger) -> list[JobTicket]:
    """The tickets whose adapters all load, before they sample; each other one is failed
    `lora_unavailable` here, so that an adapter removed after its job was accepted (or damaged in
    storage) costs that job alone, not a failed batch tried again apart or a continuous run restarted."""
    failed = bank.unloadable(lora for ticket in tickets for lora in ticket.request.loras)
    if not failed:
        return list(tickets)
    kept = []
    for ticket in tickets:
        missing = [failed[lora] for lora in ticket.request.loras if lora in failed]
        if missing:
            log.error("job %s: %s", ticket.job_id, "; ".join(map(str, missing)))
            ledger.fail(ticket, LORA_UNAVAILABLE_ERROR)
        else:
            kept.append(ticket)
    return kept
