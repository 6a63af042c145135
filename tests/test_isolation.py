"""Poison isolation in one process: a batch whose sampling raises is tried again apart, in static and in
continuous batching, with a real Redis, a real tiny model (tests/poison_models.py) and real storage.
Also the pure parts: how a failed batch is split, what counts as out of memory, the hung-work ceiling."""

import logging
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from redis import Redis

from dit_serve.config import DEFAULT_MAX_BATCH_COST
from dit_serve.contract import JobKind, JobRequest, OutputFormat
from dit_serve.jobs import SAMPLING_FAILED_ERROR, JobRecord, queue_name, record_key, rq_job_key
from dit_serve.queueing import enqueue_job
from dit_serve.storage import LocalStorage
from models.loading import LoadedModel, load_model
from tests.poison_models import Action, build_poison_model, register
from worker.batching import JobTicket, Room
from worker.continuous_batching import ContinuousBatching
from worker.isolation import halves, is_out_of_memory, retry_groups
from worker.ledger import JobLedger
from worker.metrics import WorkerMetrics
from worker.queue import JobQueue
from worker.static_batching import StaticBatching
from worker.strategy import BatchLimits
from worker.watchdog import REFERENCE_COST, ceiling_s

POISON_LABEL = 3
OOM_ABOVE = 4  # outputs: a batch of more runs out of memory
TTL_S = 3600
STEPS = 4
CPU = torch.device("cpu")


def _request(model: str, label: int, n: int = 1, **changes: object) -> JobRequest:
    fields: dict[str, object] = dict(
        kind=JobKind.IMAGE,
        model=model,
        n=n,
        seed=label,
        class_labels=[label] * n,
        guidance_scale=4.0,
        num_inference_steps=STEPS,
        width=32,
        height=32,
        output_format=OutputFormat.PNG,
    )
    return JobRequest(**(fields | changes))  # type: ignore[arg-type]


@pytest.fixture(scope="module")
def poison_model(model_dirs: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> LoadedModel:
    register()
    path = build_poison_model(
        tmp_path_factory.mktemp("poison") / "p", model_dirs["img"], POISON_LABEL, Action.RAISE, OOM_ABOVE
    )
    return load_model("p", path, CPU)


class Harness:
    """A worker's ledger and both batching strategies over one model's queue, without the worker loop."""

    def __init__(self, redis: Redis, model: LoadedModel, storage_root: Path):
        self.redis = redis
        self.model = model
        self.queue = queue_name(model.name)
        metrics = WorkerMetrics(CPU, "static")
        metrics.add_model(model)
        self.ledger = JobLedger(
            JobQueue(redis, [self.queue], "w", 30, TTL_S), LocalStorage(storage_root), metrics
        )
        limits = BatchLimits(max_batch=16, max_cost=DEFAULT_MAX_BATCH_COST)
        self.static = StaticBatching(self.ledger, limits, worker_name="w")
        self.continuous = ContinuousBatching(self.ledger, limits, "w", lambda _queue: False, self.static)

    def enqueue(self, labels: list[int]) -> list[str]:
        ids = [f"job{i}-label{label}" for i, label in enumerate(labels)]
        for job_id, label in zip(ids, labels, strict=True):
            record = JobRecord.new(_request(self.model.name, label))
            enqueue_job(self.redis, job_id, record, retries=2, ttl_s=TTL_S)
        return ids

    def take(self) -> list[JobTicket]:
        return self.ledger.take(self.queue, Room(16, DEFAULT_MAX_BATCH_COST), "e")

    def status(self, job_id: str) -> str:
        return self.redis.hget(rq_job_key(job_id), "status").decode()  # type: ignore[union-attr]

    def record(self, job_id: str) -> JobRecord:
        return JobRecord.from_hash(self.redis.hgetall(record_key(job_id)))  # type: ignore[arg-type]


@pytest.fixture
def harness(redis: Redis, poison_model: LoadedModel, tmp_path: Path) -> Iterator[Harness]:
    yield Harness(redis, poison_model, tmp_path)


def _ended(harness: Harness, ids: list[str]) -> list[str]:
    return [harness.status(job_id) for job_id in ids]


def test_in_a_static_batch_only_the_poison_job_fails(
    harness: Harness, caplog: pytest.LogCaptureFixture
) -> None:
    ids = harness.enqueue([0, POISON_LABEL, 1, 2])
    tickets = harness.take()
    assert len(tickets) == 4
    with caplog.at_level(logging.WARNING):
        harness.static.run(harness.queue, harness.model, tickets)
    assert _ended(harness, ids) == ["finished", "failed", "finished", "finished"]
    assert harness.record(ids[1]).error == SAMPLING_FAILED_ERROR
    assert all(len(harness.record(job_id).outputs) == 1 for job_id in ids if job_id != ids[1])
    assert (
        "(error) on worker w" in caplog.text
        and "trying them again as 1 job + 1 job + 1 job + 1 job" in caplog.text
    )
    assert harness.ledger.held() == [] and harness.ledger.overdue() is None


def test_out_of_memory_halves_the_batch_before_going_one_by_one(
    harness: Harness, caplog: pytest.LogCaptureFixture
) -> None:
    ids = harness.enqueue([0, 1, 2, 4, 5, POISON_LABEL])
    tickets = harness.take()
    with caplog.at_level(logging.WARNING):
        harness.static.run(harness.queue, harness.model, tickets)
    # 6 outputs: out of memory; halves of 3 fit, and the half with the poison job goes one by one
    assert _ended(harness, ids) == ["finished"] * 5 + ["failed"]
    tries = [line for line in caplog.text.splitlines() if "trying them again as" in line]
    assert "a batch of 6 jobs (out of memory)" in tries[0] and tries[0].endswith("as 3 jobs + 3 jobs")
    assert "a batch of 3 jobs (error)" in tries[1] and tries[1].endswith("as 1 job + 1 job + 1 job")
    assert len(tries) == 2


def test_a_raising_step_of_a_continuous_batch_hands_its_jobs_to_the_solo_path(
    harness: Harness, caplog: pytest.LogCaptureFixture
) -> None:
    ids = harness.enqueue([0, 1, POISON_LABEL])
    tickets = harness.take()
    with caplog.at_level(logging.WARNING):
        harness.continuous.run(harness.queue, harness.model, tickets)
    assert _ended(harness, ids) == ["finished", "finished", "failed"]
    assert "running them again in static batches" in caplog.text
    assert "trying them again as 1 job + 1 job + 1 job" in caplog.text
    assert harness.ledger.held() == []


def test_how_a_failed_batch_is_split() -> None:
    def tickets(*outputs: int) -> list[JobTicket]:
        return [
            JobTicket(f"j{i}", "q", "e", _request("m", 0, n=n, class_labels=[0] * n))
            for i, n in enumerate(outputs)
        ]

    def sizes(groups: list[list[JobTicket]]) -> list[list[int]]:
        return [[ticket.num_outputs for ticket in group] for group in groups]

    assert sizes(halves(tickets(1, 1, 1, 1, 1))) == [[1, 1], [1, 1, 1]]
    assert sizes(halves(tickets(8, 1, 1))) == [[8], [1, 1]]  # a job's outputs stay together
    assert sizes(halves(tickets(1, 1, 8))) == [[1, 1], [8]]
    oom = torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 MiB")
    assert sizes(retry_groups(tickets(1, 1, 1, 1), oom)) == [[1, 1], [1, 1]]
    assert sizes(retry_groups(tickets(1, 1, 1, 1), ValueError("nan"))) == [[1], [1], [1], [1]]
    assert is_out_of_memory(oom) and is_out_of_memory(RuntimeError("MPS backend out of memory"))
    assert not is_out_of_memory(RuntimeError("shape mismatch")) and not is_out_of_memory(MemoryError())


def test_the_ceiling_scales_with_the_batchs_cost_and_never_drops_below_the_timeout() -> None:
    reference = _request("m", 0, num_inference_steps=50, width=512, height=512)
    assert REFERENCE_COST == 50 * 512 * 512
    assert ceiling_s([reference], 600) == 600
    assert ceiling_s([_request("m", 0)], 600) == 600  # a small job still gets the whole timeout
    video = _request("m", 0, n=2, num_inference_steps=50).model_copy(update={"num_frames": 16})
    assert ceiling_s([reference, reference, reference], 10) == 30  # a batch costs its jobs' sum
    assert ceiling_s([video], 600) == 600  # 32×32 × 16 frames × 2 outputs is far below 512×512
    big = _request("m", 0, num_inference_steps=100, width=1024, height=1024)
    assert ceiling_s([big], 600) == 600 * 8
