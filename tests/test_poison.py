"""Poison jobs and hung work with real processes: an API, workers started from the dit-serve CLI with the
test-only poison family (tests/poison_models.py), a real Redis and real HTTP.

- a job whose sampling raises fails alone, and the jobs batched with it complete in the same worker;
  an out-of-memory batch is halved first;
- a job that kills its worker costs its neighbours no retry, runs alone after two deaths, and then
  fails `worker_lost`;
- a batch that hangs is given back, its worker exits and `dit-serve up`'s supervisor starts a fresh one.
"""

import os
import signal
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx
import pytest
from redis import Redis

from cli.supervisor import WorkerSupervisor
from dit_serve.jobs import (
    SAMPLING_FAILED_ERROR,
    TIMEOUT_ERROR,
    WORKER_LOST,
    record_key,
    rq_job_key,
)
from tests.conftest import Service, metric, running_service, scrape, wait_for_status
from tests.poison_models import POISON_EXIT_STATUS, POISON_WORKER, Action, build_poison_model
from worker.runner import HUNG_EXIT_STATUS

pytestmark = pytest.mark.slow
POISON_LABEL = 3
OOM_ABOVE = 4  # outputs: a larger batch of the `raise` model runs out of memory
STEPS = 4
ENDED = {"completed", "failed", "canceled"}
# Lost jobs are found within a few seconds (the defaults take 35 s), and a batch hangs after 2 s.
FAST_REAPING = {"DIT_HEARTBEAT_TTL_S": "2", "DIT_HEARTBEAT_INTERVAL_S": "0.5", "DIT_REAP_INTERVAL_S": "0.5"}
JOB_TIMEOUT_S = "2"


@pytest.fixture(scope="module")
def poison_dirs(model_dirs: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("poison-models")
    image = model_dirs["img"]
    return {
        "raise": build_poison_model(root / "raise", image, POISON_LABEL, Action.RAISE, OOM_ABOVE),
        "exit": build_poison_model(root / "exit", image, POISON_LABEL, Action.EXIT),
        "hang": build_poison_model(root / "hang", image, POISON_LABEL, Action.HANG),
    }


def _post(client: httpx.Client, model: str, label: int) -> str:
    body = {"model": model, "class_labels": [label], "num_inference_steps": STEPS, "seed": label}
    response = client.post("/v1/images", json=body)
    assert response.status_code == 202, response.text
    return response.json()["id"]


@contextmanager
def _stopped(pid: int) -> Iterator[None]:
    """The process stopped (SIGSTOP) for the block: jobs posted meanwhile are taken in one batch."""
    os.kill(pid, signal.SIGSTOP)
    try:
        yield
    finally:
        os.kill(pid, signal.SIGCONT)


def _wait(predicate, timeout_s: float, what: str) -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout_s
    while not predicate():
        assert time.monotonic() < deadline, f"timed out after {timeout_s} s waiting for {what}"
        time.sleep(0.05)


def test_a_raising_job_fails_alone_and_an_out_of_memory_batch_is_halved(
    redis_url: str, poison_dirs: dict[str, Path], tmp_path: Path
) -> None:
    models = {"raise": poison_dirs["raise"]}
    with running_service(redis_url, tmp_path, models, entry=POISON_WORKER) as svc, svc.client() as client:
        worker = svc.workers[0]
        with _stopped(worker.pid):
            batch = [_post(client, "raise", label) for label in (0, POISON_LABEL, 1, 2)]
        jobs = [wait_for_status(client, job_id, ENDED) for job_id in batch]
        with _stopped(worker.pid):
            large = [_post(client, "raise", label) for label in (4, 5, 6, 7, 8, 9)]
        large_jobs = [wait_for_status(client, job_id, ENDED) for job_id in large]
        redis = Redis.from_url(redis_url)
        attempts = [redis.hget(record_key(job_id), "attempts") for job_id in batch + large]
        log = svc.worker_log()
        alive = worker.poll() is None
    assert [job["status"] for job in jobs] == ["completed", "failed", "completed", "completed"]
    assert jobs[1]["error"] == SAMPLING_FAILED_ERROR.model_dump()
    assert [job["status"] for job in large_jobs] == ["completed"] * 6
    assert attempts == [b"1"] * 10  # tried again in the same worker, never requeued
    assert alive
    # the first batch went one by one; the second was halved (6 outputs > 4), and its halves fit
    assert "a batch of 4 jobs (error)" in log and "as 1 job + 1 job + 1 job + 1 job" in log
    assert "a batch of 6 jobs (out of memory)" in log and "as 3 jobs + 3 jobs" in log
    assert "a batch of 3 jobs" not in log


def test_a_job_that_kills_its_worker_runs_alone_after_two_deaths_and_fails_alone(
    redis_url: str, poison_dirs: dict[str, Path], tmp_path: Path
) -> None:
    redis = Redis.from_url(redis_url)
    redis.flushdb()
    svc = Service(
        redis_url, tmp_path, {"exit": poison_dirs["exit"]}, {"DIT_DEFAULT_MODEL": "exit", **FAST_REAPING}
    )

    def status(job_id: str) -> str:
        return (redis.hget(rq_job_key(job_id), "status") or b"").decode()

    try:
        svc.start_api()
        first = svc.start_worker(entry=POISON_WORKER)
        with svc.client() as client:
            with _stopped(first.pid):
                poison = _post(client, "exit", POISON_LABEL)
                innocents = [_post(client, "exit", label) for label in (0, 1, 2)]
            jobs = [poison, *innocents]
            # Two deaths with the poison job in the batch. The reaper requeues a dead worker's jobs
            # together (one script), so the next worker, started meanwhile, takes them in one batch.
            for _death in (1, 2):
                assert svc.workers[-1].wait(timeout=60) == POISON_EXIT_STATUS
                svc.start_worker(entry=POISON_WORKER)
            # now each job is taken alone: the innocent ones complete, the poison job kills its worker
            failed = wait_for_status(client, poison, {"failed", "completed"}, timeout_s=60)
            if any(status(job_id) == "queued" for job_id in innocents):
                svc.start_worker(entry=POISON_WORKER)  # the worker the poison job killed had not run them
            done = [wait_for_status(client, job_id, ENDED, timeout_s=60) for job_id in innocents]
            reaped = scrape(f"{svc.base_url}/metrics")
        records = {job_id: redis.hgetall(record_key(job_id)) for job_id in jobs}
        retries_left = [redis.hget(rq_job_key(job_id), "retries_left") for job_id in innocents]
    finally:
        svc.stop()
        redis.flushdb()
    assert failed["status"] == "failed" and failed["error"] == WORKER_LOST.model_dump()
    assert (records[poison][b"deaths"], records[poison][b"solo"], records[poison][b"batch_jobs"]) == (
        b"3",
        b"1",
        b"1",  # it was running alone when it killed its last worker
    )
    assert [job["status"] for job in done] == ["completed"] * 3  # none ended worker_lost
    assert retries_left == [b"2"] * 3  # DIT_JOB_RETRIES: none spent
    assert [records[job_id][b"deaths"] for job_id in innocents] == [b"2"] * 3
    assert metric(reaped, "dit_jobs_reaped_total", model="exit", outcome="requeued") == 8
    assert metric(reaped, "dit_jobs_reaped_total", model="exit", outcome="failed") == 1


def test_a_hung_batch_is_given_back_and_the_supervisor_starts_a_fresh_worker(
    redis_url: str, poison_dirs: dict[str, Path], tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    redis = Redis.from_url(redis_url)
    redis.flushdb()
    env = {"DIT_DEFAULT_MODEL": "hang", "DIT_JOB_TIMEOUT_S": JOB_TIMEOUT_S, **FAST_REAPING}
    svc = Service(redis_url, tmp_path, {"hang": poison_dirs["hang"]}, env)
    # `dit-serve up`'s own supervisor, starting the worker with the test-only family
    supervisor = WorkerSupervisor(
        svc.env(), redis_url, "hang", lambda: None, [sys.executable, "-m", POISON_WORKER, "worker"]
    )
    try:
        svc.start_api()
        supervisor.start()
        _wait(svc.live_workers, 60, "the supervised worker to register")
        with svc.client() as client:
            with _stopped(supervisor.pids[0]):
                hung = _post(client, "hang", POISON_LABEL)
                innocent = _post(client, "hang", 0)
            # they hang together past 2 s: both requeued, each to run alone; the worker exits, and a
            # fresh one completes the innocent job and times out on the hung one, alone
            timed_out = wait_for_status(client, hung, {"failed", "completed"}, timeout_s=60)
            completed = wait_for_status(client, innocent, ENDED, timeout_s=60)
            _wait(lambda: "hang.3" in svc.live_workers(), 60, "the third worker to register")
            after = wait_for_status(client, _post(client, "hang", 1), ENDED, timeout_s=60)
            reaped = scrape(f"{svc.base_url}/metrics")
        records = {job_id: redis.hgetall(record_key(job_id)) for job_id in (hung, innocent)}
    finally:
        supervisor.stop(timeout_s=10)
        svc.stop()
        redis.flushdb()
    assert timed_out["status"] == "failed" and timed_out["error"] == TIMEOUT_ERROR.model_dump()
    assert completed["status"] == "completed" and after["status"] == "completed"
    assert records[hung][b"attempts"] == b"2" and records[innocent][b"attempts"] == b"2"
    assert records[hung][b"solo"] == b"1" and records[innocent][b"solo"] == b"1"
    assert metric(reaped, "dit_jobs_reaped_total", model="hang", outcome="timed_out") == 1
    assert metric(reaped, "dit_jobs_reaped_total", model="hang", outcome="requeued") == 2
    # two workers exited on their own, and were restarted; the third served the new job
    assert len(supervisor.pids) == 3 and supervisor.failure is None
    assert caplog.text.count(f"exit code {HUNG_EXIT_STATUS}") == 2
