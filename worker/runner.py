"""The worker loop: take a batch, sample it, encode and store the outputs, report. Nothing more.

Queue plumbing lives in worker/queue.py, sampling in worker/sampling.py, encoding and storage in
worker/outputs.py; crash safety is the heartbeat thread here plus the reaper in dit_serve/queueing.py.
The heartbeat thread is also the watchdog: a batch past its ceiling (worker/watchdog.py) is not
heartbeated; its jobs are given back, and the worker exits with HUNG_EXIT_STATUS for its supervisor
(compose's `restart:`, `dit-serve up`) to start a fresh one, since a hung sampler cannot be stopped.
"""

import logging
import os
import threading
import time
from dataclasses import dataclass

from redis import Redis
from redis.exceptions import RedisError
from rq import SimpleWorker

from dit_serve.catalog import publish_worker, retire_worker
from dit_serve.config import (
    DEFAULT_BATCH_GAP_MS,
    DEFAULT_JOB_TIMEOUT_S,
    DEFAULT_MAX_BATCH_COST,
    DEFAULT_MAX_FILL_MS,
)
from dit_serve.jobs import queue_name
from dit_serve.queueing import reap_lost_jobs
from dit_serve.scheduling import DEFAULT_AGING_S
from dit_serve.storage import Storage
from models.loading import LoadedModel
from worker.batching import JobTicket
from worker.continuous import supports_continuous
from worker.continuous_batching import ContinuousBatching
from worker.interleave import Interleaver, QueueShape
from worker.ledger import REDIS_RETRY_S, JobLedger
from worker.metrics import WorkerMetrics
from worker.queue import JobQueue, new_execution_id
from worker.static_batching import StaticBatching
from worker.strategy import BatchLimits, BatchStrategy
from worker.watchdog import Attempt

log = logging.getLogger(__name__)

IDLE_WAIT_S = 1.0  # longest block on the wake list before looking at the queues again
HUNG_EXIT_STATUS = 70  # sysexits' EX_SOFTWARE: the worker gave up a hung batch; restart it


@dataclass(frozen=True)
class WorkerConfig:
    name: str
    max_batch: int
    max_wait_ms: int
    heartbeat_interval_s: float
    heartbeat_ttl_s: int
    reap_interval_s: float
    job_ttl_s: int
    orphan_timeout_s: float = 300.0  # queued jobs of a model with no live worker this long fail
    priority_aging_s: float = DEFAULT_AGING_S  # for low jobs the reaper puts back in the queue
    continuous: bool = False  # step-level continuous batching where the model's scheduler allows
    job_timeout_s: float = DEFAULT_JOB_TIMEOUT_S  # the reference job's ceiling (worker/watchdog.py)
    max_batch_cost: int = DEFAULT_MAX_BATCH_COST  # cost units of one batch (worker/batching.py)
    batch_gap_ms: int = DEFAULT_BATCH_GAP_MS  # the fill window (worker/fill_window.py)
    max_fill_ms: int = DEFAULT_MAX_FILL_MS
    interleave: bool = True  # a long run pauses at step boundaries for shorter batches (worker/interleave.py)

    @property
    def limits(self) -> BatchLimits:
        return BatchLimits(
            self.max_batch, self.max_batch_cost, self.max_wait_ms, self.batch_gap_ms, self.max_fill_ms
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
        self.specs = [model.spec() for model in models.values()]
        self.queue = JobQueue(
            redis,
            list(self.models),
            config.name,
            config.heartbeat_ttl_s,
            config.job_ttl_s,
            config.priority_aging_s,
        )
        self.ledger = JobLedger(self.queue, storage, metrics, config.job_timeout_s)
        shapes = {queue: QueueShape.of(model.spec()) for queue, model in self.models.items()}
        self.interleaver = Interleaver(shapes, self._waiting, self._run_interleaved, config.interleave)
        self.static = StaticBatching(self.ledger, config.limits, config.name, self.interleaver)
        self.continuous = ContinuousBatching(
            self.ledger, config.limits, config.name, self.yield_turn, self.static, self.interleaver
        )
        # Registered in RQ's worker registry only so that `rq info` and rq-dashboard list it;
        # RQ's own loop (one job at a time) never runs.
        queues = list(self.queue.queues.values())
        ttl = config.heartbeat_ttl_s
        self.rq_worker = SimpleWorker(queues, connection=redis, name=config.name, worker_ttl=ttl)
        self.stopping = threading.Event()
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
            if (hung := self.ledger.overdue()) is not None:
                self._give_up(hung)
            try:
                self._publish()
                self.ledger.heartbeat()
                if time.monotonic() - last_reap >= self.config.reap_interval_s:
                    reap_lost_jobs(
                        self.redis,
                        self.config.orphan_timeout_s,
                        self.config.job_ttl_s,
                        self.config.priority_aging_s,
                    )
                    last_reap = time.monotonic()
            except RedisError as exc:
                log.warning("heartbeat failed: %s", exc)

    def _give_up(self, hung: Attempt) -> None:
        """A batch ran past its ceiling: give its jobs back and exit, for a supervisor to restart us."""
        log.error(
            "jobs %s have sampled for %.0f s, past their ceiling of %.0f s (DIT_JOB_TIMEOUT_S scaled by "
            "their cost): giving them back and exiting with status %d, so that a supervisor starts a "
            "fresh worker",
            ", ".join(sorted(hung.job_ids)),
            time.monotonic() - hung.started,
            hung.ceiling_s,
            HUNG_EXIT_STATUS,
        )
        try:
            for job_id, outcome in self.ledger.time_out(hung):
                log.warning("job %s given back by hung worker %s: %s", job_id, self.config.name, outcome)
            retire_worker(self.redis, self.config.name)
            self.rq_worker.register_death()
        except RedisError as exc:  # the reapers treat the jobs as lost once their heartbeat expires
            log.error("could not give the jobs back: %s", exc)
        logging.shutdown()
        # The sampling thread cannot be interrupted, so the process ends here, without it.
        os._exit(HUNG_EXIT_STATUS)

    # -- one batch ---------------------------------------------------------------------------------
    def run_once(self) -> bool:
        """Take jobs from the next non-empty queue and run them to their end; False when all were empty."""
        taken = self._take_first()
        if not taken:
            self.queue.wait_for_work(self.models, IDLE_WAIT_S)
            return False
        queue, tickets = taken
        with self.metrics.working():
            self.strategy_for(queue).run(queue, self.models[queue], tickets)
        return True

    def strategy_for(self, queue: str) -> BatchStrategy:
        """Continuous batching where asked for and the model's scheduler allows; static otherwise."""
        if self.config.continuous and supports_continuous(self.models[queue]):
            return self.continuous  # no batch-filling wait: later jobs join at the next step
        return self.static

    def _take_first(self) -> tuple[str, list[JobTicket]] | None:
        """The head of the next non-empty queue (round robin), with what is compatible behind it."""
        execution = new_execution_id()
        names = list(self.models)
        for offset in range(len(names)):
            queue = names[(self._next_queue + offset) % len(names)]
            tickets = self.ledger.take(queue, self.config.limits.room, execution)
            if tickets:
                break
        else:
            return None
        self._next_queue = (names.index(queue) + 1) % len(names)
        return queue, tickets

    def yield_turn(self, queue: str) -> bool:
        """Whether a running batch of `queue` should take no more jobs: stopping, others wait, or it runs
        inside a paused one (worker/interleave.py)."""
        if self.stopping.is_set() or self.interleaver.nested:
            return True
        return bool(self._waiting([name for name in self.models if name != queue]))

    def _waiting(self, queues: list[str]) -> list[str]:
        """Those of `queues` with jobs queued."""
        if not queues:
            return []
        with self.redis.pipeline() as pipe:
            for name in queues:
                pipe.llen(self.queue.queues[name].key)
            return [name for name, length in zip(queues, pipe.execute(), strict=True) if length]

    def _run_interleaved(self, queue: str) -> bool:
        """Take one batch of `queue` and run it to its end, inside a paused run of another queue."""
        if self.stopping.is_set():
            return False
        tickets = self.ledger.take(queue, self.config.limits.room, new_execution_id())
        if not tickets:
            return False
        model = self.models[queue]
        self.metrics.interleaved.labels(model.name, model.kind).inc()
        self.strategy_for(queue).run(queue, model, tickets)
        return True
