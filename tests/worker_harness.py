"""A real Worker in this process: its loop's run_once driven by the test, on a real Redis, real storage and
real tiny models, with each watchdog arming recorded."""

from pathlib import Path

import torch
from redis import Redis

from dit_serve.caching import CachePolicy
from dit_serve.contract import JobKind, JobRequest, OutputFormat
from dit_serve.jobs import JobRecord, record_key, rq_job_key
from dit_serve.queueing import enqueue_job
from dit_serve.storage import LocalStorage
from models.loading import LoadedModel
from worker.batching import JobTicket
from worker.metrics import WorkerMetrics
from worker.runner import Worker, WorkerConfig

CPU = torch.device("cpu")
TTL_S = 3600


def job_request(
    kind: JobKind, steps: int, frames: int = 1, model: str = "m", cache: CachePolicy | None = None
) -> JobRequest:
    """One 32x32 output of class 2, seed 7, guidance 4: PNG for images, GIF (lossless) for videos."""
    return JobRequest(
        kind=kind,
        model=model,
        n=1,
        seed=7,
        class_labels=[2],
        guidance_scale=4.0,
        num_inference_steps=steps,
        width=32,
        height=32,
        num_frames=frames,
        output_format=OutputFormat.PNG if kind is JobKind.IMAGE else OutputFormat.GIF,
        cache=cache,
    )


class InProcessWorker:
    """A Worker over `models` (queue order = dict order), and what it ran."""

    def __init__(
        self,
        redis: Redis,
        models: dict[str, LoadedModel],
        root: Path,
        continuous: bool,
        interleave: bool = True,
    ):
        self.redis = redis
        self.storage = LocalStorage(root)
        config = WorkerConfig(
            name="w",
            max_batch=16,
            max_wait_ms=0,
            heartbeat_interval_s=5,
            heartbeat_ttl_s=30,
            reap_interval_s=5,
            job_ttl_s=TTL_S,
            continuous=continuous,
            batch_gap_ms=0,
            max_fill_ms=0,
            interleave=interleave,
        )
        self.metrics = WorkerMetrics(CPU, "continuous" if continuous else "static")
        for model in models.values():
            self.metrics.add_model(model)
        self.worker = Worker(config, redis, models, self.storage, self.metrics)
        self.armed: list[set[str]] = []  # the jobs of each watchdog Attempt, in order
        running = self.worker.ledger.running

        def arm(tickets: list[JobTicket]) -> None:
            self.armed.append({ticket.job_id for ticket in tickets})
            running(tickets)

        self.worker.ledger.running = arm  # type: ignore[method-assign]

    def enqueue(self, job_id: str, request: JobRequest) -> str:
        enqueue_job(self.redis, job_id, JobRecord.new(request), retries=2, ttl_s=TTL_S)
        return job_id

    def record(self, job_id: str) -> JobRecord:
        return JobRecord.from_hash(self.redis.hgetall(record_key(job_id)))  # type: ignore[arg-type]

    def status(self, job_id: str) -> str:
        return self.redis.hget(rq_job_key(job_id), "status").decode()  # type: ignore[union-attr]

    def output(self, job_id: str) -> bytes:
        return self.storage.get(self.record(job_id).outputs[0].key)

    def sample(self, name: str, **labels: str) -> float | None:
        """A sample of the worker's metrics."""
        return self.metrics.registry.get_sample_value(name, labels)
