"""Static batching's fill window (worker/fill_window.py): a fake clock, then timed arrivals on Redis."""

import threading
import time
from pathlib import Path

import pytest
import torch
from redis import Redis

from dit_serve.jobs import JobRecord, queue_name
from dit_serve.queueing import enqueue_job
from dit_serve.storage import LocalStorage
from tests.test_contract import _request as contract_request
from worker.fill_window import FillWindow
from worker.ledger import JobLedger
from worker.metrics import WorkerMetrics
from worker.queue import JobQueue, new_execution_id
from worker.static_batching import StaticBatching
from worker.strategy import BatchLimits

MODEL = "m"
QUEUE = queue_name(MODEL)
TTL_S = 3600


class FakeClock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_a_lone_job_waits_max_wait_ms_only() -> None:
    clock = FakeClock()
    window = FillWindow(max_wait_ms=20, gap_ms=100, max_fill_ms=500, clock=clock)
    clock.now += 0.019
    assert window.remaining_s() == pytest.approx(0.001)
    clock.now += 0.002
    assert window.remaining_s() < 0


def test_each_arrival_keeps_the_window_open_a_gap_more_up_to_max_fill() -> None:
    clock = FakeClock()
    window = FillWindow(max_wait_ms=20, gap_ms=100, max_fill_ms=500, clock=clock)
    clock.now += 0.010
    window.arrived()
    assert window.remaining_s() == pytest.approx(0.100)  # open till 110 ms, past the 20 ms of a lone job
    for _ in range(5):  # a job every 90 ms: each one keeps it open
        clock.now += 0.090
        assert window.remaining_s() > 0
        window.arrived()
    clock.now += 0.090
    assert clock.now - 100 == pytest.approx(0.550)
    assert window.remaining_s() < 0  # closed at 500 ms after the first job, arrivals or not


def test_no_gap_and_no_max_fill_is_the_fixed_window_of_before() -> None:
    clock = FakeClock()
    window = FillWindow(max_wait_ms=20, gap_ms=0, max_fill_ms=0, clock=clock)
    clock.now += 0.015
    window.arrived()
    assert window.remaining_s() == pytest.approx(0.005)


def _arrive(redis: Redis, ids: list[str], every_s: float) -> None:
    for job_id in ids:
        time.sleep(every_s)
        enqueue_job(redis, job_id, JobRecord.new(contract_request(model=MODEL)), retries=0, ttl_s=TTL_S)


@pytest.mark.parametrize(("gap_ms", "expected"), [(0, 2), (250, 4)])
def test_a_burst_arriving_at_gaps_joins_one_batch_only_with_a_gap(
    redis: Redis, tmp_path: Path, gap_ms: int, expected: int
) -> None:
    """Two jobs at once, then two more 80 ms apart (a burst over HTTP on 2 busy cores): the fixed 20 ms
    window takes the first two; a 250 ms gap (3x the spacing, for a loaded machine) takes all four."""
    metrics = WorkerMetrics(torch.device("cpu"), "static")
    ledger = JobLedger(JobQueue(redis, [QUEUE], "w", 30, TTL_S), LocalStorage(tmp_path), metrics)
    limits = BatchLimits(16, 10**9, max_wait_ms=20, gap_ms=gap_ms, max_fill_ms=2000)
    static = StaticBatching(ledger, limits, "w")
    _arrive(redis, ["first"], 0)
    first = ledger.take(QUEUE, limits.room, new_execution_id())
    _arrive(redis, ["b"], 0)
    arrivals = threading.Thread(target=_arrive, args=(redis, ["c", "d"], 0.08))
    arrivals.start()
    try:
        tickets = static._fill(QUEUE, first)
    finally:
        arrivals.join()
    assert [t.job_id for t in tickets] == ["first", "b", "c", "d"][:expected]
