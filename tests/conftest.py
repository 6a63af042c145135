"""Shared fixtures: a real Redis, tiny real models on disk, and real API and worker processes."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import boto3
import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families
from redis import Redis

from dit_serve.contract import ModelSpec
from dit_serve.embedded_redis import EmbeddedRedis, free_port
from dit_serve.jobs import SAMPLING_FAILED_ERROR

STARTUP_TIMEOUT_S = 60.0
POLL_S = 0.05
CLIENT_TIMEOUT_S = 90.0  # Service.client(): above the longest `?wait=` of the tests
TEST_DB = 15
MOTO_START_TIMEOUT_S = 15.0
BUCKET = "dit-outputs"
REGION = "us-east-1"  # a dedicated database when REDIS_URL points at a shared server
SHORT_SCHEDULE_TIMESTEPS = 20  # short_schedule_model: more denoising steps than this fail in sampling


# Fixtures that start API, worker, S3 or Prometheus processes: every test that uses one is `slow`, so
# that `pytest -m "not slow"` (the fast lane) runs only in-process tests. Tests that start processes
# themselves carry the mark in their own file.
PROCESS_FIXTURES = frozenset(
    {
        "service",
        "text_service",
        "continuous_service",
        "plain_service",
        "slow_service",
        "observed",
        "moto_endpoint",
        "auth_service",
    }
)


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if PROCESS_FIXTURES & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.slow)


@pytest.fixture(scope="session")
def redis_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """REDIS_URL when set (its database 15), else a real redis-server started for the session."""
    if os.environ.get("REDIS_URL"):
        base = (
            os.environ["REDIS_URL"].rsplit("/", 1)[0]
            if os.environ["REDIS_URL"].count("/") > 2
            else os.environ["REDIS_URL"]
        )
        yield f"{base}/{TEST_DB}"
        return
    with EmbeddedRedis(tmp_path_factory.mktemp("redis"), persistent=False) as server:
        yield server.url


@pytest.fixture
def redis(redis_url: str) -> Iterator[Redis]:
    client = Redis.from_url(redis_url)
    client.flushdb()
    yield client
    client.flushdb()
    client.close()


@pytest.fixture(scope="session")
def model_dirs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Tiny random-weight pipelines on disk: one per family, and a slow video model for cancel/crash tests."""
    from tests.tiny_models import build_tiny_image_model, build_tiny_video_model
    from tests.tiny_text_models import build_tiny_pixart_model, build_tiny_wan_model

    root = tmp_path_factory.mktemp("models")
    return {
        "img": build_tiny_image_model(root / "img"),
        "vid": build_tiny_video_model(root / "vid"),
        "slow": build_tiny_video_model(root / "slow", num_layers=4, num_heads=8),
        "pixart-alpha": build_tiny_pixart_model(root / "pixart-alpha"),
        "pixart-sigma": build_tiny_pixart_model(root / "pixart-sigma", sigma=True),
        "wan": build_tiny_wan_model(root / "wan"),
    }


@pytest.fixture(scope="session")
def short_schedule_model(model_dirs: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny image model with a scheduler trained on SHORT_SCHEDULE_TIMESTEPS timesteps.

    The API allows up to MAX_STEPS denoising steps for every model, so a request for more steps than
    the schedule has is accepted, and its sampling raises (diffusers' set_timesteps refuses it): a
    real fault from real parts, for the sampling_failed path.
    """
    path = tmp_path_factory.mktemp("short-schedule") / "short"
    shutil.copytree(model_dirs["img"], path)
    config_file = path / "scheduler" / "scheduler_config.json"
    config = json.loads(config_file.read_text())
    config_file.write_text(json.dumps({**config, "num_train_timesteps": SHORT_SCHEDULE_TIMESTEPS}))
    return path


def _wait_until(predicate, timeout_s: float, what: str) -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(POLL_S)
    raise AssertionError(f"timed out after {timeout_s} s waiting for {what}")


@dataclass
class Service:
    """An API process and worker processes on a shared Redis, driven over real HTTP."""

    redis_url: str
    tmp: Path
    models: dict[str, Path]
    env_overrides: dict[str, str] = field(default_factory=dict)
    port: int = field(default_factory=free_port)
    api: subprocess.Popen | None = None
    workers: list[subprocess.Popen] = field(default_factory=list)

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def env(self, **extra: str) -> dict[str, str]:
        env = dict(os.environ)
        env.update(
            REDIS_URL=self.redis_url,
            DIT_PORT=str(self.port),
            DIT_DATA_DIR=str(self.tmp / "data"),
            DIT_OUTPUT_DIR=str(self.tmp / "outputs"),
            DIT_MODELS=json.dumps([f"{name}={path}" for name, path in self.models.items()]),
            DIT_DEFAULT_MODEL="img",
            DIT_LOG_LEVEL="info",
            DIT_METRICS_PORT="0",  # several workers at once: a test that scrapes one gives it a port
            DIT_AUTH="off",  # tests of API keys turn it on (tests/test_auth.py)
        )
        env.update(self.env_overrides)
        env.update(extra)
        return env

    def _spawn(self, command: str, log_name: str, entry: str = "cli", **extra: str) -> subprocess.Popen:
        log = open(self.tmp / log_name, "ab")  # noqa: SIM115 - the process owns it
        return subprocess.Popen(
            [sys.executable, "-m", entry, command],
            env=self.env(**extra),
            stdout=log,
            stderr=subprocess.STDOUT,
        )

    def start_api(self) -> None:
        self.api = self._spawn("api", "api.log")
        _wait_until(self._answers, STARTUP_TIMEOUT_S, "the API to answer /healthz")

    def start_worker(self, entry: str = "cli", **extra: str) -> subprocess.Popen:
        """A worker process with the environment's overrides `extra`; `entry` is the module run with
        `python -m` (tests.poison_models: the dit-serve CLI with the test-only poison family)."""
        before = set(self.live_workers())
        worker = self._spawn("worker", f"worker{len(self.workers)}.log", entry, **extra)
        self.workers.append(worker)
        _wait_until(lambda: set(self.live_workers()) - before, STARTUP_TIMEOUT_S, "the worker to register")
        return worker

    def live_workers(self) -> list[str]:
        from dit_serve.catalog import live_workers

        return live_workers(Redis.from_url(self.redis_url))

    def _answers(self) -> bool:
        try:
            return httpx.get(f"{self.base_url}/healthz", timeout=1).status_code == 200
        except httpx.HTTPError:
            return False

    def client(self) -> httpx.Client:
        # Longer than the longest `?wait=` the tests ask for (60 s), so that a slow machine's long wait
        # ends in the job's answer, not in the client's timeout.
        return httpx.Client(base_url=self.base_url, timeout=CLIENT_TIMEOUT_S)

    def api_log(self) -> str:
        return (self.tmp / "api.log").read_text(errors="replace")

    def worker_log(self) -> str:
        return "".join(path.read_text(errors="replace") for path in sorted(self.tmp.glob("worker*.log")))

    def stop(self) -> None:
        for process in [*self.workers, self.api]:
            if process and process.poll() is None:
                process.send_signal(signal.SIGTERM)
        for process in [*self.workers, self.api]:
            if process:
                try:
                    process.wait(timeout=20)
                except subprocess.TimeoutExpired:
                    process.kill()
                    process.wait()


@contextmanager
def paused(process: subprocess.Popen) -> Iterator[None]:
    """A process stopped (SIGSTOP) for the block: a paused worker takes no job, and the jobs it holds stay
    in_progress, however fast the machine (its heartbeat TTL is far longer than any pause here)."""
    process.send_signal(signal.SIGSTOP)
    try:
        yield
    finally:
        process.send_signal(signal.SIGCONT)


def wait_for_status(client: httpx.Client, job_id: str, statuses: set[str], timeout_s: float = 60.0) -> dict:
    """Poll a job until its status is one of `statuses`; returns the job object."""
    deadline = time.monotonic() + timeout_s
    job: dict = {}
    while time.monotonic() < deadline:
        job = client.get(f"/v1/jobs/{job_id}").json()
        if job["status"] in statuses:
            return job
        time.sleep(POLL_S)
    raise AssertionError(f"job {job_id} still {job.get('status')} after {timeout_s} s, wanted {statuses}")


def sampling_fails_then_serves(
    service: Service, client: httpx.Client, too_many: dict, steps_that_fit: int
) -> dict:
    """Post `too_many` (more steps than the model's schedule): it fails `sampling_failed` with the fixed
    message, the cause logged by the worker with the job id; the same request with `steps_that_fit`
    then completes. Returns the completed job."""
    doomed = client.post("/v1/images", json=too_many)
    assert doomed.status_code == 202  # the API cannot know that the model's schedule is shorter
    failed = client.get(f"/v1/jobs/{doomed.json()['id']}", params={"wait": 60}).json()
    assert failed["status"] == "failed" and failed["outputs"] == [], failed
    assert failed["error"]["code"] == "sampling_failed"
    assert failed["error"]["message"] == SAMPLING_FAILED_ERROR.message  # what to do, no exception text
    assert not any(name in failed["error"]["message"] for name in service.live_workers())
    # the cause (diffusers refusing more steps than the schedule has) is in the worker's log, by job id
    logged = [line for line in service.worker_log().splitlines() if failed["id"] in line]
    assert logged and "num_inference_steps" in service.worker_log(), logged
    fits = client.post("/v1/images", json={**too_many, "num_inference_steps": steps_that_fit})
    done = client.get(f"/v1/jobs/{fits.json()['id']}", params={"wait": 60}).json()
    assert done["status"] == "completed", done
    return done


def scrape(url: str) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    """Every sample of a Prometheus /metrics page, keyed by (sample name, its labels)."""
    text = httpx.get(url, timeout=10).text
    return {
        (sample.name, frozenset(sample.labels.items())): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def metric(samples: dict[tuple[str, frozenset[tuple[str, str]]], float], name: str, **labels: str) -> float:
    """The value of one sample; a missing one fails the test with the names that are there."""
    key = (name, frozenset(labels.items()))
    assert key in samples, (
        f"no sample {name}{labels}; have {sorted({n for n, _ in samples if n.startswith(name)})}"
    )
    return samples[key]


@contextmanager
def running_service(
    redis_url: str, tmp: Path, models: dict[str, Path], env: dict[str, str] | None = None, **worker_env: str
) -> Iterator[Service]:
    """An API and one worker on an emptied Redis database, stopped (and the database emptied) after."""
    Redis.from_url(redis_url).flushdb()
    svc = Service(redis_url, tmp, models, env or {})
    try:
        svc.start_api()
        svc.start_worker(**worker_env)
        yield svc
    finally:
        svc.stop()
        Redis.from_url(redis_url).flushdb()


@contextmanager
def api_without_workers(redis_url: str, tmp: Path, spec: ModelSpec, **env: str) -> Iterator[Service]:
    """A real API process on an emptied Redis, with `spec` registered as served but no worker: jobs
    are accepted and stay queued (for admission tests)."""
    from dit_serve.catalog import publish_worker

    redis = Redis.from_url(redis_url)
    redis.flushdb()
    svc = Service(redis_url, tmp, {}, {"DIT_DEFAULT_MODEL": spec.name, **env})
    publish_worker(redis, "registered-only", [spec], ttl_s=600)
    try:
        svc.start_api()
        yield svc
    finally:
        svc.stop()
        redis.flushdb()


@pytest.fixture(scope="module")
def service(
    redis_url: str, model_dirs: dict[str, Path], tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Service]:
    """API + one worker serving the fast tiny models (module-scoped: started once per test file)."""
    models = {"img": model_dirs["img"], "vid": model_dirs["vid"]}
    with running_service(redis_url, tmp_path_factory.mktemp("service"), models) as svc:
        yield svc


# --- a real S3 endpoint: moto's server mode over HTTP -------------------------------------------


def _wait_until_up(url: str, process: subprocess.Popen[bytes]) -> None:
    """Poll url until the server answers, failing fast if the process dies."""
    deadline = time.monotonic() + MOTO_START_TIMEOUT_S
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"moto server exited early with code {process.returncode}")
        try:
            with urllib.request.urlopen(url, timeout=1):
                return
        except urllib.error.HTTPError:
            return  # it answered, even if with an error status
        except OSError:
            time.sleep(0.1)
    raise RuntimeError(f"moto server at {url} did not answer within {MOTO_START_TIMEOUT_S} s")


@pytest.fixture(scope="session")
def moto_endpoint(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """Start `python -m moto.server` on a free port with dummy credentials; yield its URL."""
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    empty = tmp_path_factory.mktemp("aws") / "empty"
    empty.write_text("")
    with pytest.MonkeyPatch.context() as env:
        env.setenv("AWS_ACCESS_KEY_ID", "test")
        env.setenv("AWS_SECRET_ACCESS_KEY", "test")
        env.setenv("AWS_DEFAULT_REGION", REGION)
        env.setenv("AWS_CONFIG_FILE", str(empty))  # ignore any real AWS config on this machine
        env.setenv("AWS_SHARED_CREDENTIALS_FILE", str(empty))
        env.delenv("AWS_PROFILE", raising=False)
        env.delenv("AWS_SESSION_TOKEN", raising=False)
        process = subprocess.Popen(
            [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        try:
            _wait_until_up(url, process)
            boto3.client("s3", endpoint_url=url, region_name=REGION).create_bucket(Bucket=BUCKET)
            yield url
        finally:
            process.terminate()
            try:
                process.wait(timeout=5)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
