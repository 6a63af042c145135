"""API keys end to end: `dit-serve keys` through the CLI, a real API with auth on, a real worker."""

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from redis import Redis

from dit_serve.embedded_redis import free_port
from dit_serve.keys import create_key
from tests.conftest import STARTUP_TIMEOUT_S, Service, _wait_until, paused, running_service

JOB = {"prompt": "red circle", "num_inference_steps": 2}


def keys_cli(redis_url: str, *args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "REDIS_URL": redis_url}
    return subprocess.run(
        [sys.executable, "-m", "cli", "keys", *args], env=env, capture_output=True, text=True, timeout=60
    )


@pytest.fixture(scope="module")
def auth_service(
    redis_url: str, model_dirs: dict[str, Path], tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Service]:
    with running_service(
        redis_url, tmp_path_factory.mktemp("auth"), {"img": model_dirs["img"]}, {"DIT_AUTH": "on"}
    ) as svc:
        yield svc


@pytest.fixture(scope="module")
def secrets(auth_service: Service) -> dict[str, str]:
    """Keys made with `dit-serve keys create --json`: alice, bob, and the admin ops."""
    made = {}
    for name, *flags in (["alice", "--rate-per-min", "30", "--max-queued", "4"], ["bob"], ["ops", "--admin"]):
        result = keys_cli(auth_service.redis_url, "create", name, *flags, "--json")
        assert result.returncode == 0, result.stderr
        created = json.loads(result.stdout)
        assert created["name"] == name and created["webhook_secret"].startswith("whsec_")
        made[name] = created["key"]
    return made


def client(svc: Service, secret: str | None = None) -> httpx.Client:
    headers = {"Authorization": f"Bearer {secret}"} if secret else {}
    return httpx.Client(base_url=svc.base_url, timeout=30, headers=headers)


def assert_unauthorized(response: httpx.Response) -> None:
    assert response.status_code == 401, response.text
    assert response.json()["error"]["code"] == "unauthorized"
    assert response.headers["WWW-Authenticate"] == "Bearer"


def assert_not_found(response: httpx.Response) -> None:
    assert response.status_code == 404, response.text
    assert response.json()["error"]["code"] == "job_not_found"


def test_keys_cli_creates_lists_and_revokes_and_redis_holds_no_secret(
    auth_service: Service, secrets: dict[str, str]
) -> None:
    listed = keys_cli(auth_service.redis_url, "list", "--json")
    assert listed.returncode == 0, listed.stderr
    rows = {row["name"]: row for row in json.loads(listed.stdout)}
    assert set(rows) == {"alice", "bob", "ops"}
    assert (rows["alice"]["rate_per_min"], rows["alice"]["max_queued"], rows["alice"]["admin"]) == (
        30,
        4,
        False,
    )
    assert rows["ops"]["admin"] and rows["ops"]["created_at"] > 0
    assert not any(secret in listed.stdout for secret in secrets.values())
    assert "key_hash" not in listed.stdout and "key" not in rows["bob"]
    redis = Redis.from_url(auth_service.redis_url)
    stored = b"".join(
        repr(redis.hgetall(key) if redis.type(key) == b"hash" else redis.get(key)).encode()
        for key in redis.keys("dit:key*")
    )
    assert stored and not any(secret.encode() in stored for secret in secrets.values())

    temp = json.loads(keys_cli(auth_service.redis_url, "create", "temp", "--json").stdout)["key"]
    with client(auth_service, temp) as temp_client:
        assert temp_client.get("/v1/models").status_code == 200
        revoked = keys_cli(auth_service.redis_url, "revoke", "temp")
        assert revoked.returncode == 0, revoked.stderr
        assert_unauthorized(temp_client.get("/v1/models"))
    assert keys_cli(auth_service.redis_url, "revoke", "temp").returncode != 0


def test_missing_malformed_unknown_and_revoked_keys_get_401(
    auth_service: Service, secrets: dict[str, str]
) -> None:
    with client(auth_service) as anonymous:
        for headers in (
            {},
            {"Authorization": f"Basic {secrets['alice']}"},
            {"Authorization": "Bearer"},
            {"Authorization": secrets["alice"]},
            {"Authorization": "Bearer dit_unknown0000000000000000000000000000000000000"},
            {"Authorization": "Bearer not-even-our-prefix"},
        ):
            assert_unauthorized(anonymous.get("/v1/models", headers=headers))
        assert_unauthorized(anonymous.post("/v1/images", json=JOB))
        assert_unauthorized(anonymous.get("/v1/jobs"))
        assert_unauthorized(anonymous.get("/v1/jobs/abc"))
        for path in ("/healthz", "/readyz", "/metrics", "/docs", "/redoc", "/openapi.json"):
            assert anonymous.get(path).status_code == 200, path
        assert not any(secret in anonymous.get("/metrics").text for secret in secrets.values())


def test_jobs_are_private_to_their_key_and_visible_to_admins(
    auth_service: Service, secrets: dict[str, str]
) -> None:
    with (
        client(auth_service, secrets["alice"]) as alice,
        client(auth_service, secrets["bob"]) as bob,
        client(auth_service, secrets["ops"]) as ops,
    ):
        job = alice.post("/v1/images", json=JOB).json()["id"]
        done = alice.get(f"/v1/jobs/{job}", params={"wait": 60}).json()
        assert done["status"] == "completed", done
        # Prometheus may read /metrics without a key: no series names a job, a key or a prompt.
        metrics = httpx.get(f"{auth_service.base_url}/metrics", timeout=30).text
        assert job not in metrics and "alice" not in metrics and done["request"]["prompt"] not in metrics
        for caller in (alice, ops):
            assert caller.get(f"/v1/jobs/{job}").status_code == 200
            assert caller.get(f"/v1/jobs/{job}", params={"wait": 1}).status_code == 200
            assert caller.get(f"/v1/jobs/{job}/outputs/0").status_code == 200
        for request in (
            bob.get(f"/v1/jobs/{job}"),
            bob.get(f"/v1/jobs/{job}", params={"wait": 5}),
            bob.get(f"/v1/jobs/{job}/outputs/0"),
            bob.delete(f"/v1/jobs/{job}"),
            bob.get("/v1/jobs/no-such-job"),
        ):
            assert_not_found(request)
        with paused(auth_service.workers[0]):  # the next jobs stay queued
            first, second = (alice.post("/v1/images", json=JOB).json()["id"] for _ in range(2))
            assert_not_found(bob.delete(f"/v1/jobs/{first}"))
            assert alice.delete(f"/v1/jobs/{first}").json()["status"] == "canceled"
            assert ops.delete(f"/v1/jobs/{second}").json()["status"] == "canceled"


def test_listing_shows_own_jobs_newest_first_by_pages_and_status(
    auth_service: Service, secrets: dict[str, str]
) -> None:
    _, carol_secret = create_key(Redis.from_url(auth_service.redis_url), "carol")
    with (
        client(auth_service, carol_secret) as carol,
        client(auth_service, secrets["bob"]) as bob,
        client(auth_service, secrets["ops"]) as ops,
        paused(auth_service.workers[0]),
    ):
        bobs = bob.post("/v1/images", json=JOB).json()["id"]
        jobs = [carol.post("/v1/images", json=JOB).json()["id"] for _ in range(3)]
        assert carol.delete(f"/v1/jobs/{jobs[1]}").status_code == 200
        page = carol.get("/v1/jobs", params={"limit": 2}).json()
        assert [job["id"] for job in page["data"]] == [jobs[2], jobs[1]] and page["has_more"]
        rest = carol.get("/v1/jobs", params={"limit": 2, "after": page["last_id"]}).json()
        assert [job["id"] for job in rest["data"]] == [jobs[0]] and not rest["has_more"]
        queued = carol.get("/v1/jobs", params={"status": "queued"}).json()
        assert [job["id"] for job in queued["data"]] == [jobs[2], jobs[0]]
        canceled = carol.get("/v1/jobs", params={"status": "canceled"}).json()["data"]
        assert [job["id"] for job in canceled] == [jobs[1]] and canceled[0]["status"] == "canceled"
        for bad in ({"limit": 0}, {"limit": 101}, {"status": "done"}):
            assert carol.get("/v1/jobs", params=bad).status_code == 422, bad
        invalid = carol.get("/v1/jobs", params={"after": "no-such-job"})
        assert invalid.json()["error"]["code"] == "invalid_cursor"
        assert bobs not in {job["id"] for job in carol.get("/v1/jobs", params={"limit": 100}).json()["data"]}
        assert not set(jobs) & {
            job["id"] for job in bob.get("/v1/jobs", params={"limit": 100}).json()["data"]
        }
        everyone = [job["id"] for job in ops.get("/v1/jobs", params={"limit": 4}).json()["data"]]
        assert everyone == [*reversed(jobs), bobs]


def test_api_defaults_to_auth_on(auth_service: Service) -> None:
    """`dit-serve api` with neither --auth nor DIT_AUTH wants a key (`up` on 127.0.0.1 does not: test_cli)."""
    port = free_port()
    env = auth_service.env(DIT_PORT=str(port))
    del env["DIT_AUTH"]
    api = subprocess.Popen(
        [sys.executable, "-m", "cli", "api"], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    base = f"http://127.0.0.1:{port}"

    def answers() -> bool:
        try:
            return httpx.get(f"{base}/healthz", timeout=1).status_code == 200
        except httpx.HTTPError:
            return False

    try:
        _wait_until(answers, STARTUP_TIMEOUT_S, "the API to answer /healthz")
        assert_unauthorized(httpx.get(f"{base}/v1/jobs", timeout=10))
    finally:
        api.terminate()
        api.wait(timeout=20)
