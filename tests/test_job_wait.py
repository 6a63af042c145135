"""`GET /v1/jobs/{id}?wait=N`: one request that answers when the job ends, for every waiter.

The API re-reads a waited-on job at least every WAIT_SLICE_S anyway, so "the waiter answered" proves
little; these tests measure how long after the job's end (its `completed_at`, written in the same
Redis script that signals the end) each waiter answered. Waiters are spread over one slice, so that
if the signal were lost some waiter would sit out most of a slice before its next look. The worker is
paused (SIGSTOP) while the waiters line up, so that the job ends after they all wait on any machine.
"""

import time
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
from redis import Redis

from app.views import WAIT_SLICE_S
from dit_serve.jobs import ended_key
from tests.conftest import POLL_S, Service, paused, running_service, wait_for_status

WAIT_S = 30  # far above any job here: a waiter that answers well before it was woken by the job's end
# A woken waiter answers within this of the job's end, on a loaded 2-core machine too; waiters spread
# over one slice that missed the signal answer up to a whole slice (1 s) after it.
WAKE_BOUND_S = 0.5
MANY_WAITERS = 20
SHORT_WAIT_S = 1.25  # not a whole number of slices: a wait that overran to the next slice shows
TIMEOUT_SLACK_S = 0.5  # how much later than `wait` a timed-out wait may answer
BLOCKED_TIMEOUT_S = 30.0


@pytest.fixture(scope="module")
def service(
    redis_url: str, model_dirs: dict[str, Path], tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Service]:
    """The fast image model, and the slow video model so that a job is really in flight."""
    models = {"img": model_dirs["img"], "slow": model_dirs["slow"]}
    with running_service(redis_url, tmp_path_factory.mktemp("wait"), models) as svc:
        yield svc


SLOW_VIDEO = {"model": "slow", "prompt": "red circle moving left", "num_inference_steps": 100}
QUICK_IMAGE = {"prompt": "red circle", "num_inference_steps": 10}


@dataclass(frozen=True)
class Answer:
    """One waiter's request: the job it got back, and when (unix seconds) it asked and was answered."""

    body: dict
    asked_at: float
    answered_at: float

    def gap_s(self) -> float:
        """How long after the job ended the answer came."""
        return self.answered_at - self.body["completed_at"]


def _wait(service: Service, job_id: str, delay_s: float = 0.0, wait: float = WAIT_S) -> Answer:
    time.sleep(delay_s)
    with service.client() as client:
        asked_at = time.time()
        body = client.get(f"/v1/jobs/{job_id}", params={"wait": wait}, timeout=wait + 10).json()
        return Answer(body, asked_at, time.time())


def _blocked_waiters(redis: Redis) -> int:
    """Clients blocked in BLMOVE: the API's waits, and nothing else (a worker blocks in BLPOP)."""
    return sum(1 for client in redis.client_list() if client["cmd"] == "blmove" and "b" in client["flags"])


def _spread_waiters(pool: ThreadPoolExecutor, service: Service, job_id: str, count: int) -> list[Future]:
    """`count` waiters on one job, asking at times spread over one re-read slice; back once all block."""
    redis = Redis.from_url(service.redis_url)
    waiters = [pool.submit(_wait, service, job_id, k * WAIT_SLICE_S / count) for k in range(count)]
    deadline = time.monotonic() + BLOCKED_TIMEOUT_S
    while _blocked_waiters(redis) < count:
        assert time.monotonic() < deadline, f"{count} waiters never all blocked on the job's end"
        assert not any(waiter.done() for waiter in waiters), "a waiter answered before the job ended"
        time.sleep(POLL_S / 5)
    return waiters


def _assert_woken(answers: list[Answer], status: str) -> None:
    for answer in answers:
        assert answer.body["status"] == status, answer.body
        assert answer.asked_at < answer.body["completed_at"], "a waiter asked after the end: nothing to wake"
    gaps = sorted(answer.gap_s() for answer in answers)
    assert gaps[-1] < WAKE_BOUND_S, (
        f"waiters answered {gaps[0]:.3f}..{gaps[-1]:.3f} s after the job ended: not woken by its end, "
        f"but by their next look at it (every {WAIT_SLICE_S} s)"
    )


def _running_slow_video(client: httpx.Client) -> str:
    job_id = client.post("/v1/videos", json=SLOW_VIDEO).json()["id"]
    wait_for_status(client, job_id, {"in_progress"})
    return job_id


def test_many_waiters_are_woken_by_the_workers_signal(service: Service) -> None:
    with service.client() as client, ThreadPoolExecutor(MANY_WAITERS) as pool:
        with paused(service.workers[0]):
            # queued until the worker goes on, so every waiter is waiting before the job runs at all
            job = client.post("/v1/images", json=QUICK_IMAGE).json()
            waiters = _spread_waiters(pool, service, job["id"], MANY_WAITERS)
        answers = [waiter.result() for waiter in waiters]
        assert answers[0].body["progress"] == 100 and answers[0].body["outputs"]
        _assert_woken(answers, "completed")
        # an ended job answers at once however long the wait asked for
        again = _wait(service, job["id"])
        assert again.body["status"] == "completed" and again.answered_at - again.asked_at < WAKE_BOUND_S
    # the worker signalled the end once, and the waiters' BLMOVE left the signal for later waiters
    assert Redis.from_url(service.redis_url).llen(ended_key(job["id"])) == 1


def test_a_queued_jobs_cancel_wakes_the_waiters(service: Service) -> None:
    """The API cancels a queued job, and signals its end."""
    with service.client() as client, ThreadPoolExecutor(4) as pool, paused(service.workers[0]):
        job_id = client.post("/v1/videos", json=SLOW_VIDEO).json()["id"]
        waiters = _spread_waiters(pool, service, job_id, 4)
        assert client.delete(f"/v1/jobs/{job_id}").status_code == 200
        _assert_woken([waiter.result() for waiter in waiters], "canceled")
    assert Redis.from_url(service.redis_url).llen(ended_key(job_id)) == 1


def test_a_running_jobs_cancel_wakes_the_waiters(service: Service) -> None:
    """The worker drops a running job at its next step, and signals its end."""
    with service.client() as client, ThreadPoolExecutor(4) as pool:
        job_id = _running_slow_video(client)
        with paused(service.workers[0]):
            waiters = _spread_waiters(pool, service, job_id, 4)
            assert client.delete(f"/v1/jobs/{job_id}").status_code == 202
        _assert_woken([waiter.result() for waiter in waiters], "canceled")
    assert Redis.from_url(service.redis_url).llen(ended_key(job_id)) == 1


def test_a_wait_on_a_running_job_runs_out_on_time(service: Service) -> None:
    with service.client() as client:
        job_id = _running_slow_video(client)
        with paused(service.workers[0]):  # in_progress for as long as the wait, however fast the machine
            began = time.monotonic()
            body = client.get(f"/v1/jobs/{job_id}", params={"wait": SHORT_WAIT_S}).json()
            elapsed = time.monotonic() - began
        client.delete(f"/v1/jobs/{job_id}")
    assert body["status"] == "in_progress" and body["progress"] < 100
    # not early (the wait is the client's to choose), and not a whole slice late
    assert SHORT_WAIT_S <= elapsed < SHORT_WAIT_S + TIMEOUT_SLACK_S, f"the wait took {elapsed:.3f} s"


def test_without_wait_a_running_job_answers_at_once(service: Service) -> None:
    with service.client() as client:
        job = client.post("/v1/videos", json=SLOW_VIDEO).json()
        body = client.get(f"/v1/jobs/{job['id']}").json()
        assert body["status"] in ("queued", "in_progress")
        client.delete(f"/v1/jobs/{job['id']}")


@pytest.mark.parametrize("wait", ["-1", "61", "soon"])
def test_a_bad_wait_is_a_422(service: Service, wait: str) -> None:
    with service.client() as client:
        job = client.post("/v1/images", json={"prompt": "red circle"}).json()
        response = client.get(f"/v1/jobs/{job['id']}", params={"wait": wait})
    assert response.status_code == 422 and response.json()["error"]["code"] == "invalid_request"
    assert "wait" in response.json()["error"]["message"]


def test_waiting_on_an_unknown_job_is_a_404_at_once(service: Service) -> None:
    answer = _wait(service, "0" * 32)
    assert answer.body["error"]["code"] == "job_not_found" and answer.answered_at - answer.asked_at < 1
