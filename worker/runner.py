"""The worker loop: take a batch, sample it, encode and store the outputs, report. Nothing more.

Queue plumbing lives in worker/queue.py, sampling in worker/sampling.py, encoding and storage in
worker/outputs.py; crash safety is the heartbeat thread here plus the reaper in dit_serve/queueing.py.
"""

import logging
import threading
import time
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial

import numpy as np
import torch
from redis import Redis
from redis.exceptions import RedisError
from rq import SimpleWorker

from dit_serve.catalog import ModelDefaults, ModelSpec, publish_worker, retire_worker
from dit_serve.jobs import SAMPLING_FAILED, STORAGE_FAILED, JobError, queue_name
from dit_serve.queueing import reap_lost_jobs
from dit_serve.storage import Storage
from models.loading import LoadedModel
from worker.batching import Batch, JobTicket
from worker.continuous import supports_continuous
from worker.continuous_run import ContinuousRun
from worker.metrics import WorkerMetrics
from worker.outputs import store_outputs
from worker.queue import JobQueue, new_execution_id
from worker.sampling import generate
from worker.stages import SAMPLING, StageTimer

log = logging.getLogger(__name__)

SAMPLING_PROGRESS = 95  # progress reported when denoising ends; decode, encode and store take the rest
IDLE_WAIT_S = 1.0  # longest block on the wake list before looking at the queues again
FILL_POLL_S = 0.002  # while filling a batch, how often to look for more compatible jobs
REDIS_RETRY_S = 1.0
SETTLE_RETRY_S = 300.0  # after this long, a finished job is left to the reaper (it reruns)


@dataclass(frozen=True)
class WorkerConfig:
    name: str
    max_batch: int
    max_wait_ms: int
    heartbeat_interval_s: float
    heartbeat_ttl_s: int
    reap_interval_s: float
    job_ttl_s: int
    continuous: bool = False  # step-level continuous batching where the model's scheduler allows


def model_spec(model: LoadedModel) -> ModelSpec:
    """What the API may accept for this model."""
    limits = model.limits()
    return ModelSpec(
        name=model.name,
        kind=model.kind,
        family=model.family,
        conditioning=model.conditioning,
        sizes=limits.sizes,
        default_size=limits.sizes[0],
        size_multiple=limits.size_multiple,
        max_pixels=limits.max_pixels,
        defaults=ModelDefaults(
            num_inference_steps=limits.default_steps,
            guidance_scale=limits.default_guidance,
            num_frames=limits.default_frames,
        ),
        labels=model.labels,
        max_frames=limits.max_frames,
        frames_multiple=limits.frames_multiple,
    )


class Worker:
    """Serves the queues of the models it holds, one batched denoising loop at a time."""

    def __init__(
        self,
        config: WorkerConfig,
        redis: Redis,
        models: dict[str, LoadedModel],
        storage: Storage,
        metrics: WorkerMetrics,
    ):
        self.config = config
        self.metrics = metrics
        self.redis = redis
        self.models = {queue_name(name): model for name, model in models.items()}
        self.specs = [model_spec(model) for model in models.values()]
        self.storage = storage
        self.queue = JobQueue(redis, list(self.models), config.name, config.heartbeat_ttl_s, config.job_ttl_s)
        # Registered in RQ's worker registry only so that `rq info` and rq-dashboard list it;
        # RQ's own loop (one job at a time) never runs.
        queues = list(self.queue.queues.values())
        ttl = config.heartbeat_ttl_s
        self.rq_worker = SimpleWorker(queues, connection=redis, name=config.name, worker_ttl=ttl)
        self.stopping = threading.Event()
        self._held: dict[str, JobTicket] = {}
        self._held_lock = threading.Lock()
        self._next_queue = 0

    # -- lifecycle ---------------------------------------------------------------------------------
    def serve_forever(self) -> None:
        """Run until `stopping` is set; the batch in flight is finished first (warm shutdown)."""
        self._publish()
        self.rq_worker.register_birth()
        heartbeat = threading.Thread(target=self._heartbeat_loop, name="heartbeat", daemon=True)
        heartbeat.start()
        log.info("worker %s serving %s", self.config.name, ", ".join(spec.name for spec in self.specs))
        try:
            while not self.stopping.is_set():
                try:
                    self.run_once()
                except RedisError as exc:
                    log.warning("redis unavailable (%s); retrying in %.0f s", exc, REDIS_RETRY_S)
                    time.sleep(REDIS_RETRY_S)
        finally:
            self.stopping.set()
            heartbeat.join(timeout=self.config.heartbeat_interval_s + 1)
            try:
                retire_worker(self.redis, self.config.name)
                self.rq_worker.register_death()
            except RedisError:
                log.warning("could not retire worker %s: redis unavailable", self.config.name)

    def _publish(self) -> None:
        ttl = self.config.heartbeat_ttl_s
        publish_worker(self.redis, self.config.name, self.specs, ttl)
        if self.rq_worker.birth_date is not None:
            self.rq_worker.heartbeat(timeout=ttl)

    def _heartbeat_loop(self) -> None:
        last_reap = 0.0
        while not self.stopping.wait(self.config.heartbeat_interval_s):
            try:
                self._publish()
                with self._held_lock:
                    held = list(self._held.values())
                self.queue.heartbeat(held)
                if time.monotonic() - last_reap >= self.config.reap_interval_s:
                    reap_lost_jobs(self.redis)
                    last_reap = time.monotonic()
            except RedisError as exc:
                log.warning("heartbeat failed: %s", exc)

    def release(self, job_ids: set[str] | list[str]) -> None:
        with self._held_lock:
            for job_id in job_ids:
                self._held.pop(job_id, None)

    # -- one batch ---------------------------------------------------------------------------------
    def run_once(self) -> bool:
        """Take and run one batch; returns False when there was nothing to do."""
        taken = self._take_first()
        if not taken:
            self.queue.wait_for_work(self.models, IDLE_WAIT_S)
            return False
        queue, tickets, execution = taken
        with self.metrics.working():
            if self.config.continuous and supports_continuous(self.models[queue]):
                # No batch-filling wait: later jobs join the running batch at its next step.
                ContinuousRun(self, queue).run(tickets)
            else:
                self._run_batch(Batch.from_tickets(self._fill(queue, tickets, execution)))
        return True

    def _take_first(self) -> tuple[str, list[JobTicket], str] | None:
        """The head of the next non-empty queue (round robin), with what is compatible behind it."""
        execution = new_execution_id()
        names = list(self.models)
        for offset in range(len(names)):
            queue = names[(self._next_queue + offset) % len(names)]
            tickets = self.queue.take(queue, self.config.max_batch, execution)
            if tickets:
                break
        else:
            return None
        self._next_queue = (names.index(queue) + 1) % len(names)
        self.hold(tickets)
        return queue, tickets, execution

    def hold(self, tickets: list[JobTicket]) -> None:
        """Heartbeat these jobs until released; they were just taken from their queue."""
        self.metrics.taken(tickets)
        with self._held_lock:
            self._held.update((ticket.job_id, ticket) for ticket in tickets)

    def other_queues_waiting(self, queue: str) -> bool:
        """Whether any other queue this worker serves has jobs waiting."""
        others = [self.queue.queues[name].key for name in self.models if name != queue]
        if not others:
            return False
        with self.redis.pipeline() as pipe:
            for key in others:
                pipe.llen(key)
            return any(pipe.execute())

    def _fill(self, queue: str, tickets: list[JobTicket], execution: str) -> list[JobTicket]:
        """Up to max_batch compatible outputs, waiting at most max_wait_ms after the first job."""
        total = sum(ticket.num_outputs for ticket in tickets)
        deadline = time.monotonic() + self.config.max_wait_ms / 1000
        while total < self.config.max_batch and (remaining := deadline - time.monotonic()) > 0:
            try:
                more = self.queue.take(queue, self.config.max_batch - total, execution, tickets[0].compat)
                if not more:
                    # A short sleep, not a blocking pop: Redis times blocked clients out in 100 ms
                    # ticks (hz 10), so a 20 ms BLPOP waits about 100 ms.
                    time.sleep(min(FILL_POLL_S, remaining))
                    continue
            except RedisError as exc:
                log.warning(
                    "redis failed while filling a batch (%s); running the %d jobs taken", exc, len(tickets)
                )
                break
            self.hold(more)
            tickets += more
            total += sum(ticket.num_outputs for ticket in more)
        return tickets

    def _run_batch(self, batch: Batch) -> None:
        job_ids = list(batch.jobs)
        log.info("batch of %d outputs from %d jobs: %s", len(batch), len(job_ids), batch.compat)
        try:
            self._finish_batch(batch)
        finally:
            # Whatever happened, stop heartbeating these jobs: one not settled is reaped and requeued.
            self.release(job_ids)

    def _finish_batch(self, batch: Batch) -> None:
        try:
            pixels, canceled = self._sample(batch)
        except Exception as exc:
            log.exception("sampling failed for batch %s", batch.compat)
            error = JobError(SAMPLING_FAILED, f"sampling failed on worker {self.config.name}: {exc}")
            for ticket in batch.jobs.values():
                self.fail(ticket, error)
            return
        timer = self.metrics.timer(batch.first.model, batch.first.kind)
        for job_id, ticket in batch.jobs.items():
            if job_id not in canceled:
                self.store(ticket, pixels[job_id], timer)

    def store(self, ticket: JobTicket, pixels: list[np.ndarray], timer: StageTimer) -> None:
        """Encode and store a job's outputs, then record it completed (or failed, if storing failed)."""
        try:
            outputs = store_outputs(self.storage, ticket, pixels, timer)
        except Exception as exc:
            log.exception("storing outputs of job %s failed", ticket.job_id)
            self.fail(ticket, JobError(STORAGE_FAILED, f"could not store the outputs: {exc}"))
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

    def _sample(self, batch: Batch) -> tuple[dict[str, list[np.ndarray]], set[str]]:
        """Sample every row of the batch; returns each job's pixels and the jobs canceled on the way."""
        ticket = batch.first
        model = self.models[ticket.queue]
        request = ticket.request
        canceled: set[str] = set()
        rows_per_step: list[int] = []

        def on_step(done: int, total: int, rows: torch.Tensor) -> torch.Tensor | None:
            live = [batch.rows[i].job_id for i in rows.tolist()]
            rows_per_step.append(len(live))
            progress = SAMPLING_PROGRESS * done // total
            try:
                asked = self.queue.report_progress(dict.fromkeys(live, progress))
            except RedisError as exc:
                log.warning("progress report failed: %s", exc)
                return None
            for job_id in asked - canceled:
                self.cancel(batch.jobs[job_id])
                canceled.add(job_id)
                log.info("job %s canceled at step %d/%d", job_id, done, total)
            self.release(asked)
            return torch.tensor([job_id not in canceled for job_id in live]) if asked else None

        spent: dict[str, float] = {}
        pixels_out, rows = generate(
            model,
            [row.condition for row in batch.rows],
            [row.seed for row in batch.rows],
            [row.guidance_scale for row in batch.rows],
            int(request["num_inference_steps"]),
            int(request["width"]),
            int(request["height"]),
            int(request.get("num_frames") or 1),
            on_step=on_step,
            timer=self.metrics.timer(ticket.model, ticket.kind, spent),
        )
        self.metrics.stepped(ticket.model, ticket.kind, rows_per_step, spent[SAMPLING])
        pixels: dict[str, list[np.ndarray]] = defaultdict(list)
        decoded = pixels_out.numpy()  # (M, H, W, 3) or (M, F, H, W, 3)
        for row_index, array in zip(rows.tolist(), decoded, strict=True):
            pixels[batch.rows[row_index].job_id].append(array)
        return pixels, canceled
