"""Webhooks end to end: a real API (auth on) and worker, real HTTP to receivers on 127.0.0.1.

The receivers are allow-listed (DIT_WEBHOOK_ALLOW=127.0.0.1), the only host these tests connect to,
and retries wait DIT_WEBHOOK_BACKOFF_S = 0.2 s, 0.8 s, ... instead of 5 s, 20 s, ...
"""

import json
import re
import time
from collections.abc import Callable, Iterator
from datetime import datetime
from pathlib import Path

import httpx
import pytest
from redis import Redis

from dit_serve.webhook_signing import new_secret
from dit_serve.webhooks import WATCHED_KEY
from tests.conftest import SHORT_SCHEDULE_TIMESTEPS, Service, paused, running_service
from tests.test_auth import keys_cli
from tests.webhook_receiver import Answer, Received, receiving

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]
JOB = {"prompt": "red circle", "num_inference_steps": 2}
WAIT_S = 30.0


@pytest.fixture(scope="module")
def hooked(
    redis_url: str,
    model_dirs: dict[str, Path],
    short_schedule_model: Path,
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[Service]:
    models = {"img": model_dirs["img"], "slow": model_dirs["slow"], "short": short_schedule_model}
    env = {"DIT_AUTH": "on", "DIT_WEBHOOK_ALLOW": "127.0.0.1", "DIT_WEBHOOK_BACKOFF_S": "0.2"}
    with running_service(redis_url, tmp_path_factory.mktemp("webhooks"), models, env) as svc:
        yield svc


@pytest.fixture(scope="module")
def alice(hooked: Service) -> dict[str, str]:
    """A key made with `dit-serve keys create --json`: its secret and its webhook secret."""
    result = keys_cli(hooked.redis_url, "create", "alice", "--json")
    assert result.returncode == 0, result.stderr
    created = json.loads(result.stdout)
    assert created["webhook_secret"].startswith("whsec_") and created["key"].startswith("dit_")
    return created


def client(svc: Service, key: dict[str, str]) -> httpx.Client:
    return httpx.Client(base_url=svc.base_url, timeout=30, headers={"Authorization": f"Bearer {key['key']}"})


def documented_verifier() -> Callable[[str, dict[str, str], bytes], bool]:
    """`verify_webhook` exactly as the README's Webhooks section gives it."""
    readme = (ROOT / "README.md").read_text()
    (code,) = [
        block
        for block in re.findall(r"```python\n(.*?)```", readme, re.DOTALL)
        if "def verify_webhook" in block
    ]
    namespace: dict[str, object] = {}
    exec(compile(code, "README.md", "exec"), namespace)  # noqa: S102 - our own docs, under test
    return namespace["verify_webhook"]  # type: ignore[return-value]


def submit(http: httpx.Client, body: dict, path: str = "/v1/images") -> str:
    response = http.post(path, json=body)
    assert response.status_code == 202, response.text
    return response.json()["id"]


def types(received: list[Received]) -> list[str]:
    return [request.payload["type"] for request in received]


def test_a_failing_receiver_gets_the_final_event_once_accepted_verified_by_the_docs_snippet(
    hooked: Service, alice: dict[str, str]
) -> None:
    with receiving(lambda n: Answer(500 if n <= 2 else 200)) as hook, client(hooked, alice) as http:
        job_id = submit(http, {**JOB, "webhook_url": hook.url()})
        received = hook.wait_for(lambda got: len(got) >= 3, WAIT_S, "three attempts")
        time.sleep(1.0)  # long enough for a fourth attempt, were one to come
        received = hook.requests()
        job = http.get(f"/v1/jobs/{job_id}").json()
    assert len(received) == 3 and [request.status for request in received] == [500, 500, 200]
    assert {request.headers["webhook-id"] for request in received} == {f"{job_id}:completed"}
    assert len({request.body for request in received}) == 1  # the same delivery, retried
    assert types(received) == ["job.completed"] * 3  # the default: the final state only
    payload = received[-1].payload
    assert payload["data"]["id"] == job_id and payload["data"]["status"] == "completed"
    assert (
        payload["data"]["request"]["webhook_events"] == ["completed"] and len(payload["data"]["outputs"]) == 1
    )
    assert received[1].at - received[0].at >= 0.2 and received[2].at - received[1].at >= 0.8  # backoff

    verify = documented_verifier()
    accepted = received[-1]
    assert verify(alice["webhook_secret"], accepted.headers, accepted.body)
    assert not verify(new_secret(), accepted.headers, accepted.body)  # another key's secret
    assert not verify(alice["webhook_secret"], accepted.headers, accepted.body + b" ")

    assert job["request"]["webhook_url"] == hook.url()
    (delivery,) = job["deliveries"]
    assert (delivery["event"], delivery["id"], delivery["type"], delivery["status"]) == (
        "completed",
        f"{job_id}:completed",
        "job.completed",
        "delivered",
    )
    assert (delivery["attempts"], delivery["last_status"], delivery["next_attempt_at"]) == (3, 200, None)
    assert delivery["delivered_at"] >= job["completed_at"]
    assert Redis.from_url(hooked.redis_url).zcard(WATCHED_KEY) == 0


def test_started_progress_and_completed_events_when_asked(hooked: Service, alice: dict[str, str]) -> None:
    events = ["started", "progress", "completed"]
    with receiving() as hook, client(hooked, alice) as http:
        # 12 steps: long enough that a progress event is sent before the end, even on a loaded machine
        body = {"model": "slow", "prompt": "red circle moving up", "num_inference_steps": 12}
        job_id = submit(http, {**body, "webhook_url": hook.url(), "webhook_events": events}, "/v1/videos")
        received = hook.wait_for(lambda got: "job.completed" in types(got), WAIT_S, "the final event")
        job = http.get(f"/v1/jobs/{job_id}").json()
    # Deliveries are sent concurrently and not ordered, so each kind is counted, not placed.
    kinds = types(received)
    assert (kinds.count("job.started"), kinds.count("job.completed")) == (1, 1) and "job.progress" in kinds, (
        kinds
    )
    progress = sorted(
        (request.payload for request in received if request.payload["type"] == "job.progress"),
        key=lambda event: event["timestamp"],
    )
    values = [event["data"]["progress"] for event in progress]
    assert values == sorted(set(values)) and all(0 < value < 100 for value in values), values
    times = [datetime.fromisoformat(event["timestamp"]).timestamp() for event in progress]
    assert all(later - earlier >= 0.4 for earlier, later in zip(times, times[1:], strict=False)), times
    ids = {request.headers["webhook-id"] for request in received}
    assert len(ids) == len(received) and {f"{job_id}:started", f"{job_id}:completed"} <= ids
    assert {f"{job_id}:progress:{n}" for n in range(1, len(progress) + 1)} <= ids
    statuses = {delivery["event"]: delivery["status"] for delivery in job["deliveries"]}
    assert list(statuses) == events and statuses["started"] == statuses["completed"] == "delivered"
    assert statuses["progress"] in ("delivered", "superseded")  # the last one may be dropped at the end


def test_a_canceled_queued_job_and_a_failed_job_deliver_their_final_event(
    hooked: Service, alice: dict[str, str]
) -> None:
    with receiving() as hook, client(hooked, alice) as http:
        with paused(hooked.workers[0]):  # the job stays queued
            canceled_id = submit(http, {**JOB, "webhook_url": hook.url("/canceled")})
            assert http.delete(f"/v1/jobs/{canceled_id}").status_code == 200
            (canceled,) = hook.wait_for(lambda got: len(got) >= 1, WAIT_S, "the canceled event")
        too_many = {**JOB, "model": "short", "num_inference_steps": SHORT_SCHEDULE_TIMESTEPS + 5}
        failed_id = submit(http, {**too_many, "webhook_url": hook.url("/failed")})
        received = hook.wait_for(lambda got: len(got) >= 2, WAIT_S, "the failed event")
    assert (canceled.path, canceled.payload["type"], canceled.payload["data"]["id"]) == (
        "/canceled",
        "job.canceled",
        canceled_id,
    )
    assert canceled.payload["data"]["started_at"] is None  # it never started, and sent no started event
    failed = received[1]
    assert (failed.path, failed.payload["type"], failed.headers["webhook-id"]) == (
        "/failed",
        "job.failed",
        f"{failed_id}:completed",
    )
    assert failed.payload["data"]["error"]["code"] == "sampling_failed"


def test_a_slow_receiver_does_not_slow_the_batch(hooked: Service, alice: dict[str, str]) -> None:
    receiver_delay_s = 3.0
    with receiving(lambda _n: Answer(200, delay_s=receiver_delay_s)) as hook, client(hooked, alice) as http:
        started = time.monotonic()
        job_id = submit(http, {**JOB, "webhook_url": hook.url(), "webhook_events": ["started", "completed"]})
        hook.wait_for(lambda got: len(got) >= 1, WAIT_S, "the started event")  # now held for 3 s
        job = http.get(f"/v1/jobs/{job_id}", params={"wait": 30}).json()
        ended_s = time.monotonic() - started
        pending = {delivery["event"]: delivery for delivery in job["deliveries"]}
        assert job["status"] == "completed" and ended_s < receiver_delay_s, (ended_s, job)
        assert pending["started"]["status"] == "pending" and pending["started"]["delivered_at"] is None
        hook.wait_for(lambda got: len(got) >= 2, WAIT_S, "the final event")
        time.sleep(receiver_delay_s + 0.5)
        done = http.get(f"/v1/jobs/{job_id}").json()
    assert [delivery["status"] for delivery in done["deliveries"]] == ["delivered", "delivered"]
    assert [delivery["attempts"] for delivery in done["deliveries"]] == [1, 1]


FORBIDDEN_URLS = [
    "http://hooks.example.com/in",  # http, and not allow-listed
    "https://10.0.0.1/in",
    "https://169.254.169.254/latest/meta-data/",
    "https://127.0.0.2/in",  # loopback; only 127.0.0.1 is allow-listed
    "https://[::1]/in",
    "https://[::ffff:169.254.169.254]/in",
    "https://0.0.0.0/in",
    "https://[fd00:ec2::254]/in",  # AWS' IPv6 metadata address
    "https://2130706434/in",  # 127.0.0.2 as one number
]


@pytest.mark.parametrize("url", FORBIDDEN_URLS)
def test_a_forbidden_webhook_url_is_422_and_queues_nothing(
    hooked: Service, alice: dict[str, str], url: str
) -> None:
    redis = Redis.from_url(hooked.redis_url)
    before = set(redis.scan_iter("dit:job:*"))
    with client(hooked, alice) as http:
        response = http.post("/v1/images", json={**JOB, "webhook_url": url})
    assert response.status_code == 422, response.text
    error = response.json()["error"]
    assert error["code"] == "webhook_url_forbidden" and (
        "https" in error["message"] or "may not" in error["message"]
    )
    assert set(redis.scan_iter("dit:job:*")) == before and redis.zcard(WATCHED_KEY) == 0
    assert sum(redis.llen(key) for key in redis.scan_iter("rq:queue:*")) == 0


def test_webhook_events_without_a_url_are_422(hooked: Service, alice: dict[str, str]) -> None:
    with client(hooked, alice) as http:
        response = http.post("/v1/images", json={**JOB, "webhook_events": ["started"]})
    assert (
        response.status_code == 422
        and "webhook_events needs a webhook_url" in response.json()["error"]["message"]
    )


def test_an_unsent_delivery_of_a_receiver_that_was_never_there_keeps_its_schedule(
    hooked: Service, alice: dict[str, str]
) -> None:
    """Nothing listens on the port: each attempt fails to connect and the next one is scheduled."""
    with receiving() as gone:
        url = gone.url()
    with client(hooked, alice) as http:
        job_id = submit(http, {**JOB, "webhook_url": url})
        deadline = time.monotonic() + WAIT_S
        while time.monotonic() < deadline:
            job = http.get(f"/v1/jobs/{job_id}").json()
            if (
                job["deliveries"]
                and job["deliveries"][0]["attempts"] >= 2
                and job["deliveries"][0]["next_attempt_at"]
            ):
                break
            time.sleep(0.1)
    (delivery,) = job["deliveries"]
    assert delivery["status"] == "pending" and delivery["last_status"] is None
    assert (
        delivery["last_error"].startswith("connection failed")
        and delivery["next_attempt_at"] > time.time() - 1
    )
