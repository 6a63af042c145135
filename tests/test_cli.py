"""`dit-serve up` from an empty directory, its worker's supervision and shutdown, and the API when Redis
is down: real processes, real HTTP."""

import io
import logging
import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import av
import httpx
import numpy as np
import pytest
from PIL import Image
from redis import Redis

from cli import supervisor
from dit_serve.catalog import live_workers
from dit_serve.embedded_redis import free_port
from evaluation.classifier import classify, load_classifier
from evaluation.judge import judge_clips
from models.training.shapes import image_labels
from tests.conftest import wait_for_status

pytestmark = pytest.mark.slow
READY_TIMEOUT_S = 120.0


def _children(pid: int) -> list[int]:
    out = subprocess.run(["ps", "-o", "pid=", "--ppid", str(pid)], capture_output=True, text=True).stdout
    return [int(line) for line in out.split()]


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    status = Path(f"/proc/{pid}/status")
    return status.exists() and "zombie" not in status.read_text()


def _clean_env() -> dict[str, str]:
    return {
        key: value for key, value in os.environ.items() if key != "REDIS_URL" and not key.startswith("DIT_")
    }


def test_up_serves_default_models_with_embedded_redis_and_stops_cleanly(tmp_path: Path) -> None:
    port = free_port()
    log = open(tmp_path / "up.log", "wb")  # noqa: SIM115
    command = ["up", "--port", str(port), "--metrics-port", str(free_port())]
    up = subprocess.Popen(
        [sys.executable, "-m", "cli", *command],
        cwd=tmp_path, env=_clean_env(), stdout=log, stderr=subprocess.STDOUT,
    )  # fmt: skip
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + READY_TIMEOUT_S
        while True:
            assert up.poll() is None, (tmp_path / "up.log").read_text()
            try:
                if httpx.get(f"{base}/readyz", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert time.monotonic() < deadline, "dit-serve up never became ready"
            time.sleep(0.2)
        with httpx.Client(base_url=base, timeout=30) as client:
            models = {model["name"]: model for model in client.get("/v1/models").json()["data"]}
            assert set(models) == {"dit-shapes-image", "dit-shapes-video"}
            # the shipped adapter comes with the bundled image model (models/bundled/loras)
            assert [lora["name"] for lora in models["dit-shapes-image"]["loras"]] == ["outline"]
            assert models["dit-shapes-video"]["loras"] == []
            image = client.post("/v1/images", json={"prompt": "red circle", "seed": 0}).json()
            video = client.post("/v1/videos", json={"prompt": "green square moving up", "seed": 0}).json()
            image = wait_for_status(client, image["id"], {"completed", "failed"})
            video = wait_for_status(client, video["id"], {"completed", "failed"})
            assert (image["status"], video["status"]) == ("completed", "completed")
            png = client.get(image["outputs"][0]["url"]).content
            mp4 = client.get(video["outputs"][0]["url"]).content
            # One scrape target: the API's /metrics carries the worker's series too.
            metrics = client.get("/metrics").text
        assert re.search(r'^dit_worker_metrics_up\{url="[^"]+"\} 1\.0$', metrics, re.M), metrics
        assert 'dit_images_generated_total{model="dit-shapes-image"} 1.0' in metrics
        assert 'dit_video_frames_generated_total{model="dit-shapes-video"} 16.0' in metrics
        assert 'dit_jobs_accepted_total{kind="image",model="dit-shapes-image"} 1.0' in metrics
        # The bundled, trained models by default: "red circle" gives a red circle, and
        # "green square moving up" a green square moving up.
        classifier = load_classifier()
        image_pixels = np.asarray(Image.open(io.BytesIO(png)).convert("RGB"))[None]
        assert image_labels()[classify(image_pixels, classifier)[0]] == "red circle"
        with av.open(io.BytesIO(mp4)) as container:
            frames = np.stack([frame.to_ndarray(format="rgb24") for frame in container.decode(video=0)])
        assert frames.shape == (16, 32, 32, 3)
        still, direction, consistency = judge_clips(frames[None], classifier)[0]
        assert (image_labels()[still], direction) == ("green square", "up") and consistency >= 0.75
        assert list((tmp_path / "data" / "outputs" / "jobs").iterdir())
        assert (tmp_path / "data" / "redis").is_dir()  # the embedded Redis keeps its append-only file here
        children = _children(up.pid)
        assert len(children) == 2  # the embedded redis-server and the worker
    finally:
        up.send_signal(signal.SIGINT)
        up.wait(timeout=60)
        log.close()
    assert up.returncode == 0, (tmp_path / "up.log").read_text()
    assert not [pid for pid in children if _alive(pid)], "dit-serve up left child processes behind"


class Up:
    """A `dit-serve up` process started by a test, its console in a file, and every child it had."""

    def __init__(self, workdir: Path, *flags: str):
        workdir.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        self.base = f"http://127.0.0.1:{self.port}"
        self.log_path = workdir / "up.log"
        self._log = open(self.log_path, "wb")  # noqa: SIM115
        command = ["up", "--port", str(self.port), "--data-dir", str(workdir / "data"), *flags]
        self.process = subprocess.Popen(
            [sys.executable, "-m", "cli", *command],
            cwd=workdir, env=_clean_env(), stdout=self._log, stderr=subprocess.STDOUT,
        )  # fmt: skip
        self.seen_children: set[int] = set()

    @property
    def console(self) -> str:
        return self.log_path.read_text()

    def children(self) -> list[int]:
        found = _children(self.process.pid)
        self.seen_children.update(found)
        return found

    def worker_pid(self) -> int | None:
        for pid in self.children():
            try:
                if b"worker" in Path(f"/proc/{pid}/cmdline").read_bytes():
                    return pid
            except FileNotFoundError:  # it exited since
                pass
        return None

    def wait_ready(self) -> dict:
        deadline = time.monotonic() + READY_TIMEOUT_S
        while True:
            assert self.process.poll() is None, self.console
            self.children()
            try:
                response = httpx.get(f"{self.base}/readyz", timeout=2)
                if response.status_code == 200:
                    return response.json()
            except httpx.HTTPError:
                pass
            assert time.monotonic() < deadline, f"dit-serve up never became ready:\n{self.console}"
            time.sleep(0.2)

    def stop(self, signum: signal.Signals) -> tuple[int, list[int]]:
        """Signal `up` alone and wait; its exit status, and the children it left alive (then killed)."""
        self.children()
        if self.process.poll() is None:
            self.process.send_signal(signum)
        try:
            self.process.wait(timeout=60)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
        self._log.close()
        orphans = [pid for pid in self.seen_children if _alive(pid)]
        for pid in orphans:
            os.kill(pid, signal.SIGKILL)
        return self.process.returncode, orphans


def test_two_ups_on_one_machine_each_serve_their_own_worker_metrics(tmp_path: Path) -> None:
    ups = [Up(tmp_path / "a"), Up(tmp_path / "b")]  # neither given --metrics-port
    try:
        for up in ups:
            assert up.wait_ready()["workers"] == 1
        urls = []
        for up in ups:
            metrics = httpx.get(f"{up.base}/metrics", timeout=30).text
            found = re.search(r'^dit_worker_metrics_up\{url="([^"]+)"\} 1\.0$', metrics, re.M)
            assert found, metrics
            urls.append(found.group(1))
            # A series only the worker exports, re-exported by its API.
            assert 'dit_images_generated_total{model="dit-shapes-image"} 0.0' in metrics
        assert urls[0] != urls[1]
    finally:
        stopped = [up.stop(signal.SIGINT) for up in ups]
    assert stopped == [(0, []), (0, [])], [up.console for up in ups]


def test_sigterm_to_up_alone_stops_its_worker_then_redis(tmp_path: Path) -> None:
    up = Up(tmp_path, "--metrics-port", str(free_port()))  # whatever else holds the default port
    try:
        up.wait_ready()
        children = up.children()
        assert len(children) == 2 and up.worker_pid() in children  # the worker and the embedded Redis
    finally:
        code, orphans = up.stop(signal.SIGTERM)
    assert code == 0, up.console
    assert not orphans, f"dit-serve up left {orphans} behind:\n{up.console}"
    assert "stopping the worker" in up.console


def test_up_restarts_a_killed_worker(tmp_path: Path) -> None:
    up = Up(tmp_path, "--metrics-port", str(free_port()))  # the restarted worker serves on it again
    try:
        up.wait_ready()
        killed = up.worker_pid()
        assert killed
        os.kill(killed, signal.SIGKILL)
        deadline = time.monotonic() + 30
        while "restarted the worker" not in up.console:
            assert up.process.poll() is None, up.console
            assert time.monotonic() < deadline, f"the killed worker was not restarted:\n{up.console}"
            time.sleep(0.2)
        assert "killed by SIGKILL. Restarting it in 1 s" in up.console
        restarted = up.worker_pid()
        assert restarted and restarted != killed
        # The dead worker's registration is gone, so /readyz counts the new one alone.
        assert up.wait_ready()["workers"] == 1
        with httpx.Client(base_url=up.base, timeout=30) as client:
            job = client.post("/v1/images", json={"prompt": "red circle", "seed": 0}).json()
            assert wait_for_status(client, job["id"], {"completed", "failed"})["status"] == "completed"
    finally:
        stopped = up.stop(signal.SIGTERM)
    assert stopped == (0, []), up.console


def test_up_exits_when_its_worker_cannot_start(tmp_path: Path) -> None:
    up = Up(tmp_path, "--model", "x=/nonexistent")
    try:
        deadline = time.monotonic() + 90
        while up.process.poll() is None:
            up.children()
            assert time.monotonic() < deadline, f"dit-serve up kept running:\n{up.console}"
            time.sleep(0.1)
    finally:
        code, orphans = up.stop(signal.SIGINT)
    assert code == 1, up.console
    assert len(up.seen_children) == 2, "the embedded Redis and the worker should have started"
    assert not orphans, f"dit-serve up left {orphans} behind:\n{up.console}"
    last_line = up.console.strip().splitlines()[-1]
    assert last_line.startswith("dit-serve up stopped: the worker exited before it was ready"), up.console
    assert "/nonexistent is not a directory" in last_line


def test_supervisor_gives_up_after_quick_consecutive_failures(
    redis: Redis, redis_url: str, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    # A stand-in worker that registers, then crashes: no torch, so each start takes a fraction of a second.
    crashing_worker = (
        "import os, time; from redis import Redis; from dit_serve.catalog import publish_worker; "
        "publish_worker(Redis.from_url(os.environ['REDIS_URL']), os.environ['DIT_WORKER_NAME'], [], 30); "
        "time.sleep(0.5); raise SystemExit('crashed on purpose')"
    )
    monkeypatch.setattr(supervisor, "WORKER_COMMAND", [sys.executable, "-c", crashing_worker])
    monkeypatch.setattr(supervisor, "RESTART_BACKOFF_S", 0.01)
    gave_up = threading.Event()
    watcher = supervisor.WorkerSupervisor({**os.environ, "REDIS_URL": redis_url}, redis_url, "t", gave_up.set)
    with caplog.at_level(logging.INFO, logger=supervisor.__name__):
        watcher.start()
        try:
            assert gave_up.wait(60), caplog.text
        finally:
            watcher.stop(5)
    assert len(watcher.pids) == supervisor.MAX_QUICK_FAILURES
    assert watcher.failure and f"died {len(watcher.pids)} times in a row" in watcher.failure, watcher.failure
    assert "crashed on purpose" in watcher.failure
    assert caplog.text.count("Restarting it in") == supervisor.MAX_QUICK_FAILURES - 1
    assert live_workers(redis) == []  # each dead worker's registration was retired at once
    assert not [pid for pid in watcher.pids if _alive(pid)]


def test_api_answers_503_with_the_error_shape_when_redis_is_down(tmp_path: Path) -> None:
    port = free_port()
    env = {
        **_clean_env(),
        "REDIS_URL": f"redis://127.0.0.1:{free_port()}/0",
        "DIT_OUTPUT_DIR": str(tmp_path),
        "DIT_AUTH": "off",
    }
    api = subprocess.Popen(
        [sys.executable, "-m", "cli", "api", "--port", str(port)],
        env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                assert httpx.get(f"{base}/healthz", timeout=2).status_code == 200  # alive without Redis
                break
            except httpx.HTTPError:
                assert time.monotonic() < deadline
                time.sleep(0.1)
        for method, path, body in [
            ("POST", "/v1/images", {"prompt": "red circle"}),
            ("GET", "/v1/jobs/abc", None),
            ("GET", "/readyz", None),
            ("GET", "/v1/models", None),
        ]:
            response = httpx.request(method, f"{base}{path}", json=body, timeout=30)
            assert response.status_code == 503, (path, response.text)
            error = response.json()["error"]
            assert error["code"] == "redis_unavailable"
            assert error["request_id"] == response.headers["X-Request-ID"]  # a 5xx names its request
            assert "127.0.0.1" not in error["message"] and "Error" not in error["message"]  # no cause text
        # /metrics still answers, so the outage shows on the dashboards; the cluster series, which
        # come from Redis, are left out rather than reported wrong.
        metrics = httpx.get(f"{base}/metrics", timeout=30)
        assert metrics.status_code == 200
        assert 'dit_jobs_rejected_total{kind="image",reason="redis_unavailable"} 1.0' in metrics.text
        assert 'route="/v1/models",status="503"} 1.0' in metrics.text
        assert "dit_workers_live" not in metrics.text and "dit_queue_depth" not in metrics.text
        assert "\ndit_redis_up 0.0\n" in metrics.text
    finally:
        api.terminate()
        api.wait(timeout=20)
