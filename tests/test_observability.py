"""Observability checked for real: a real Prometheus server (Debian's `prometheus` package) scrapes a
real API and worker with the shipped scrape jobs and alert rules, and every panel query of the shipped
Grafana dashboard and every alert expression is evaluated through Prometheus' HTTP API.

Without the prometheus binary these tests skip, unless DIT_REQUIRE_TOOLS=1 (as `.ci/run` sets it,
after installing the package), where they fail.
"""

import json
import math
import os
import shutil
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from PIL import Image

from bench.dashboard import render as render_dashboard
from bench.prometheus import PROMETHEUS_DIR, PrometheusServer
from dit_serve.embedded_redis import free_port
from tests.conftest import Service, metric, running_service, scrape, wait_for_status

ROOT = Path(__file__).resolve().parents[1]
DASHBOARDS = sorted((ROOT / "docker" / "grafana" / "dashboards").glob("*.json"))
SCRAPE_INTERVAL = "1s"
# Grafana's own variables, as a panel would be rendered over the last few minutes.
GRAFANA_VARIABLES = {"$__rate_interval": "2m", "$__interval": "15s", "$__range": "5m"}
SCRAPED_TIMEOUT_S = 30.0
STEPS = 3


def _binary(name: str) -> str:
    path = shutil.which(name)
    if path:
        return path
    message = f"{name} is not installed: `apt-get install prometheus` (Debian) provides it"
    if os.environ.get("DIT_REQUIRE_TOOLS") == "1":
        pytest.fail(message)
    pytest.skip(message)


def panels(dashboard: dict[str, Any]) -> list[dict[str, Any]]:
    """Every panel with queries, rows' children included."""
    found = []
    for panel in dashboard["panels"]:
        found += panels(panel) if panel.get("type") == "row" and panel.get("panels") else []
        if panel.get("targets"):
            found.append(panel)
    return found


def render(expr: str) -> str:
    for variable, value in GRAFANA_VARIABLES.items():
        expr = expr.replace(variable, value)
    assert "$" not in expr, f"unknown Grafana variable in {expr!r}"
    return expr


def alert_rules() -> list[dict[str, Any]]:
    groups = yaml.safe_load((PROMETHEUS_DIR / "alerts.yml").read_text())["groups"]
    return [rule for group in groups for rule in group["rules"]]


# --- promtool on the shipped files ------------------------------------------------------------------


@pytest.mark.parametrize(
    "args",
    [
        ["check", "config", "prometheus.yml"],
        ["check", "rules", "alerts.yml"],
        ["test", "rules", "alerts.test.yml"],  # each alert fires on its data, and not before
    ],
    ids=["check-config", "check-rules", "test-rules"],
)
def test_promtool_passes_on_the_shipped_files(args: list[str]) -> None:
    result = subprocess.run(
        [_binary("promtool"), *args], cwd=PROMETHEUS_DIR, capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stdout + result.stderr


# --- a real Prometheus against a real service -------------------------------------------------------


def value(prometheus: PrometheusServer, expr: str) -> float:
    result = prometheus.query(expr)
    return float(result[0]["value"][1]) if result else math.nan


def wait_for(prometheus: PrometheusServer, expr: str, what: str) -> None:
    deadline = time.monotonic() + SCRAPED_TIMEOUT_S
    while not prometheus.query(expr):
        assert time.monotonic() < deadline, f"prometheus never saw {what} ({expr})"
        time.sleep(0.5)


@pytest.fixture(scope="module")
def observed(
    redis_url: str, model_dirs: dict[str, Path], tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[Service, str, PrometheusServer]]:
    """The service (image + video model, the worker's /metrics on a port), scraped by Prometheus."""
    _binary("prometheus")
    tmp = tmp_path_factory.mktemp("observed")
    worker_port = free_port()
    models = {"img": model_dirs["img"], "vid": model_dirs["vid"]}
    with running_service(redis_url, tmp, models, DIT_METRICS_PORT=str(worker_port)) as svc:
        targets = {"dit-api": f"127.0.0.1:{svc.port}", "dit-worker": f"127.0.0.1:{worker_port}"}
        prometheus = PrometheusServer(tmp / "prometheus", targets, SCRAPE_INTERVAL)
        try:
            # Two scrapes of every target before any test's jobs, so that rates see them happen.
            wait_for(prometheus, "count(count_over_time(up[1m]) >= 2) == 3", "two scrapes of each target")
            yield svc, f"http://127.0.0.1:{worker_port}/metrics", prometheus
        finally:
            prometheus.stop()


def test_one_job_is_counted_exactly(observed: tuple[Service, str, PrometheusServer]) -> None:
    """Two outputs, STEPS steps, alone in its batch: every histogram and counter moves by what it should."""
    svc, worker_metrics, _ = observed
    before = scrape(worker_metrics)
    with svc.client() as client:
        job = client.post("/v1/images", json={"prompt": "red circle", "n": 2, "num_inference_steps": STEPS})
        job = wait_for_status(client, job.json()["id"], {"completed", "failed"})
    assert job["status"] == "completed"
    after = scrape(worker_metrics)
    img = {"model": "img", "kind": "image"}

    def moved(name: str, **labels: str) -> float:
        return metric(after, name, **labels) - metric(before, name, **labels)

    assert moved("dit_denoise_step_seconds_count", **img) == STEPS
    assert moved("dit_batch_rows_sum", **img) == 2 * STEPS  # both outputs in every step
    assert moved("dit_sampling_loop_seconds_count", **img) == 1
    assert moved("dit_conditioning_seconds_count", **img) == 1
    assert moved("dit_vae_decode_seconds_count", **img) == 1
    assert moved("dit_output_encode_seconds_count", **img) == 2
    assert moved("dit_storage_write_seconds_count", **img) == 2
    assert moved("dit_queue_wait_seconds_count", **img) == 1
    assert moved("dit_job_latency_seconds_count", **img) == 1
    assert moved("dit_jobs_finished_total", **img, status="completed", code="") == 1
    assert moved("dit_images_generated_total", model="img") == 2
    assert moved("dit_worker_busy_seconds_total") > 0
    # A stage cannot take longer than the job it is part of, nor a step longer than the loop.
    loop = moved("dit_sampling_loop_seconds_sum", **img)
    assert 0 < moved("dit_denoise_step_seconds_sum", **img) <= loop * 1.001
    assert loop < moved("dit_job_latency_seconds_sum", **img)
    assert metric(after, "dit_worker_models_loaded", model="vid", kind="video", family="dit-video") == 1
    assert metric(after, "dit_worker_device_memory_bytes", device="cpu", type="resident") > 10e6


def test_api_counts_refusals_and_reads_the_queues(observed: tuple[Service, str, PrometheusServer]) -> None:
    svc, _, _ = observed
    api_metrics = f"{svc.base_url}/metrics"
    before = scrape(api_metrics)
    with svc.client() as client:
        assert client.post("/v1/images", json={"prompt": "red circle", "n": 0}).status_code == 422
        assert client.post("/v1/videos", json={"prompt": "red circle", "model": "img"}).status_code == 422
        assert (
            client.post("/v1/images", content=b"{", headers={"content-type": "application/json"}).status_code
            == 422
        )
        assert client.get("/v1/jobs/nope").status_code == 404  # not a submission: not a refusal
    after = scrape(api_metrics)

    def moved(name: str, **labels: str) -> float:
        return metric(after, name, **labels) - metric(before, name, **labels)

    assert moved("dit_jobs_rejected_total", kind="image", reason="invalid_request") == 1
    assert moved("dit_jobs_rejected_total", kind="video", reason="wrong_kind") == 1
    assert moved("dit_jobs_rejected_total", kind="image", reason="invalid_json") == 1
    assert (
        sum(v for (name, _), v in after.items() if name == "dit_jobs_rejected_total")
        == sum(v for (name, _), v in before.items() if name == "dit_jobs_rejected_total") + 3
    )
    assert metric(after, "dit_workers_live") == metric(after, "dit_redis_up") == 1
    assert metric(after, "dit_queue_depth", queue="dit-serve.img", model="img") == 0
    assert metric(after, "dit_queue_oldest_job_age_seconds", queue="dit-serve.img", model="img") == 0


def test_every_dashboard_panel_and_alert_rule_works_in_prometheus(
    observed: tuple[Service, str, PrometheusServer], tmp_path: Path
) -> None:
    svc, _, prometheus = observed
    with svc.client() as client:
        jobs = [
            client.post("/v1/images", json={"prompt": "red circle", "num_inference_steps": STEPS}),
            client.post("/v1/images", json={"prompt": "blue square", "n": 2, "num_inference_steps": STEPS}),
            client.post(
                "/v1/videos", json={"prompt": "red circle moving left", "num_inference_steps": STEPS}
            ),
        ]
        ended = [wait_for_status(client, job.json()["id"], {"completed", "failed"}) for job in jobs]
        assert client.post("/v1/images", json={"prompt": "not a label"}).status_code == 422
    assert [job["status"] for job in ended] == ["completed"] * 3
    frames = ended[2]["outputs"][0]["num_frames"]
    # Wait until Prometheus has scraped the final counts through both jobs' targets.
    wait_for(prometheus, 'sum(dit_images_generated_total{job="dit-worker"}) >= 3', "the images")
    wait_for(prometheus, f"sum(dit_video_frames_generated_total) >= {frames}", "the video frames")
    wait_for(prometheus, 'sum(dit_jobs_rejected_total{reason="unknown_label"}) >= 1', "the refusal")

    # Series a request creates (a route's first 422, say) need two scrapes before a rate shows them.
    deadline = time.monotonic() + SCRAPED_TIMEOUT_S
    while (empty := _panels_without_data(prometheus)) and time.monotonic() < deadline:
        time.sleep(0.5)
    assert not empty, "panels without data:\n" + "\n".join(empty)

    # Rates over the run: images/s and frames/s are what was generated.
    assert value(prometheus, 'sum(increase(dit_images_generated_total{job="dit-worker"}[5m]))') > 0
    assert value(prometheus, "max(dit_workers_live)") == 1

    # `python -m bench.dashboard render` draws every panel from the same Prometheus.
    picture = tmp_path / "dashboard.png"
    end = time.time()
    for dashboard_file in DASHBOARDS:
        drawn = render_dashboard(prometheus, dashboard_file, picture, end - 120, end, "1m")
        assert drawn == len(panels(json.loads(dashboard_file.read_text())))
        with Image.open(picture) as image:
            assert image.format == "PNG" and image.width > 1000 and image.height > 1000

    rules = alert_rules()
    for rule in rules:
        prometheus.query(rule["expr"])  # parses and runs
    names = {rule["alert"] for rule in rules}
    deadline = time.monotonic() + SCRAPED_TIMEOUT_S
    while True:
        loaded = [
            rule
            for rule in prometheus.rules()
            if rule.get("lastEvaluation", "").startswith("2")
            and not rule["lastEvaluation"].startswith("0001")
        ]
        if {rule["name"] for rule in loaded} >= names:
            break
        assert time.monotonic() < deadline, "prometheus did not evaluate every alert rule"
        time.sleep(0.5)
    assert {rule["name"]: rule["health"] for rule in loaded} == dict.fromkeys(names, "ok")
    firing = {alert["labels"]["alertname"] for alert in prometheus.alerts()}
    assert not firing & {"DitNoLiveWorker", "DitRedisDown", "DitAPIDown", "DitWorkerMetricsDown"}, firing

    # The worker stops: its heartbeat goes, and the no-live-worker alert starts (pending for 1 m).
    worker = svc.workers[0]
    worker.send_signal(signal.SIGTERM)
    worker.wait(timeout=30)
    deadline = time.monotonic() + SCRAPED_TIMEOUT_S
    while "DitNoLiveWorker" not in {alert["labels"]["alertname"] for alert in prometheus.alerts()}:
        assert time.monotonic() < deadline, "DitNoLiveWorker never became pending after the worker stopped"
        time.sleep(0.5)
    assert value(prometheus, "max(dit_workers_live)") == 0


def _panels_without_data(prometheus: PrometheusServer) -> list[str]:
    """Every dashboard panel none of whose queries gives a finite value now."""
    empty = []
    for dashboard_file in DASHBOARDS:
        for panel in panels(json.loads(dashboard_file.read_text())):
            values = [
                float(sample["value"][1])
                for target in panel["targets"]
                for sample in prometheus.query(render(target["expr"]))
            ]
            if not any(math.isfinite(value) for value in values):
                empty.append(f"{dashboard_file.name}: {panel['title']!r} (got {values})")
    return empty
