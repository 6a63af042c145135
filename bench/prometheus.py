"""A local Prometheus server with the shipped scrape jobs and alert rules, pointed at given targets.

The shipped `docker/prometheus/prometheus.yml` finds its targets through compose (`api:8000`, the
DNS name `worker`); here each job keeps its name and path, and scrapes the addresses given instead.
Used by tests/test_observability.py and `python -m bench.dashboard`.
"""

import shutil
import signal
import subprocess
import time
from pathlib import Path
from typing import Any

import httpx
import yaml

from dit_serve.embedded_redis import free_port

PROMETHEUS_DIR = Path(__file__).resolve().parents[1] / "docker" / "prometheus"
START_TIMEOUT_S = 30.0
SELF_JOB = "prometheus"


class PrometheusAPI:
    """The HTTP API of a Prometheus server: instant and range queries, rules, alerts."""

    def __init__(self, url: str):
        self.url = url.rstrip("/")

    def _api(self, path: str, **params: object) -> Any:
        body = httpx.get(f"{self.url}/api/v1/{path}", params=params, timeout=30).json()
        if body["status"] != "success":
            raise ValueError(f"{params}: {body.get('error')}")
        return body["data"]

    def query(self, expr: str) -> list[dict[str, Any]]:
        """An instant query's series; ValueError with Prometheus' message when it cannot run."""
        return self._api("query", query=expr)["result"]

    def query_range(self, expr: str, start: float, end: float, step: float) -> list[dict[str, Any]]:
        return self._api("query_range", query=expr, start=start, end=end, step=step)["result"]

    def rules(self) -> list[dict[str, Any]]:
        return [rule for group in self._api("rules")["groups"] for rule in group["rules"]]

    def alerts(self) -> list[dict[str, Any]]:
        """Pending and firing alerts."""
        return self._api("alerts")["alerts"]


class PrometheusServer(PrometheusAPI):
    """`prometheus` as a child process on a free port, with its data under `workdir`."""

    def __init__(self, workdir: Path, targets: dict[str, str], scrape_interval: str = "1s"):
        binary = shutil.which("prometheus")
        if binary is None:
            raise FileNotFoundError("prometheus is not installed: `apt-get install prometheus` (Debian)")
        shipped = yaml.safe_load((PROMETHEUS_DIR / "prometheus.yml").read_text())
        self.port = free_port()
        super().__init__(f"http://127.0.0.1:{self.port}")
        targets = {**targets, SELF_JOB: f"127.0.0.1:{self.port}"}
        jobs = [job["job_name"] for job in shipped["scrape_configs"]]
        if set(jobs) != set(targets):
            raise ValueError(f"the shipped scrape jobs are {jobs}; targets were given for {sorted(targets)}")
        config = {
            "global": {"scrape_interval": scrape_interval, "evaluation_interval": scrape_interval},
            "rule_files": [str(PROMETHEUS_DIR / name) for name in shipped["rule_files"]],
            "scrape_configs": [
                {
                    "job_name": job["job_name"],
                    "metrics_path": job.get("metrics_path", "/metrics"),
                    "static_configs": [{"targets": [targets[job["job_name"]]]}],
                }
                for job in shipped["scrape_configs"]
            ],
        }
        workdir.mkdir(parents=True, exist_ok=True)
        (workdir / "prometheus.yml").write_text(yaml.safe_dump(config))
        self.log_path = workdir / "prometheus.log"
        self._log = open(self.log_path, "wb")  # noqa: SIM115 - closed in stop()
        self.process = subprocess.Popen(
            [
                binary,
                f"--config.file={workdir / 'prometheus.yml'}",
                f"--storage.tsdb.path={workdir / 'tsdb'}",
                f"--web.listen-address=127.0.0.1:{self.port}",
            ],
            stdout=self._log,
            stderr=subprocess.STDOUT,
        )
        deadline = time.monotonic() + START_TIMEOUT_S
        while not self._ready():
            if self.process.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"prometheus did not start: {self.log_path.read_text()[-3000:]}")
            time.sleep(0.2)

    def _ready(self) -> bool:
        try:
            return httpx.get(f"{self.url}/-/ready", timeout=1).status_code == 200
        except httpx.HTTPError:
            return False

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.process.kill()
        self._log.close()
