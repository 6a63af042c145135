"""`dit-serve up` from an empty directory, and the API when Redis is down: real processes, real HTTP."""

import io
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import av
import httpx
import numpy as np
import pytest
from PIL import Image

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
            names = {model["name"] for model in client.get("/v1/models").json()["data"]}
            assert names == {"dit-shapes-image", "dit-shapes-video"}
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


def test_api_answers_503_with_the_error_shape_when_redis_is_down(tmp_path: Path) -> None:
    port = free_port()
    env = {**_clean_env(), "REDIS_URL": f"redis://127.0.0.1:{free_port()}/0", "DIT_OUTPUT_DIR": str(tmp_path)}
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
            assert response.json()["error"]["code"] == "redis_unavailable"
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
