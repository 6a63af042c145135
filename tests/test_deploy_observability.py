"""Static checks that the shipped Prometheus and Grafana files fit docker-compose.yml and the code.

The real-server checks (every panel and alert rule through a running Prometheus) are in
tests/test_observability.py; these need no server and no Docker.
"""

import json
from pathlib import Path
from typing import Any

import pytest
import yaml

from dit_serve.config import Settings
from dit_serve.metrics import DEFAULT_WORKER_METRICS_PORT
from tests.test_deploy_static import ROOT, WORKER_DOCKERFILE, container_environment, load_compose, of

PROMETHEUS_DIR = ROOT / "docker" / "prometheus"
GRAFANA_DIR = ROOT / "docker" / "grafana"
DASHBOARD_FILES = sorted((GRAFANA_DIR / "dashboards").glob("*.json"))
PROMETHEUS_PORT = 9090


def prometheus_config() -> dict[str, Any]:
    return yaml.safe_load((PROMETHEUS_DIR / "prometheus.yml").read_text())


def scrape_job(name: str) -> dict[str, Any]:
    jobs = {job["job_name"]: job for job in prometheus_config()["scrape_configs"]}
    assert name in jobs, f"prometheus.yml has no {name!r} job: {sorted(jobs)}"
    return jobs[name]


def bind_mounts(service: str) -> dict[str, str]:
    """A service's bind mounts: container path -> repository path."""
    mounts = {}
    for volume in load_compose()["services"][service].get("volumes", []):
        source, target = volume.split(":")[:2]
        if source.startswith("./"):
            mounts[target] = source
    return mounts


def test_every_bind_mount_exists_in_the_repository() -> None:
    for name in load_compose()["services"]:
        for target, source in bind_mounts(name).items():
            assert (ROOT / source).exists(), f"{name} mounts {source} at {target}, which is not in the repo"


def test_prometheus_reads_the_shipped_config_and_rules() -> None:
    prometheus = load_compose()["services"]["prometheus"]
    assert bind_mounts("prometheus") == {"/etc/prometheus": "./docker/prometheus"}
    assert "--config.file=/etc/prometheus/prometheus.yml" in prometheus["command"]
    assert any(volume.endswith(":/prometheus") for volume in prometheus["volumes"]), "TSDB not on a volume"
    for rule_file in prometheus_config()["rule_files"]:
        assert (PROMETHEUS_DIR / rule_file).is_file(), rule_file


def test_prometheus_scrapes_the_api_service() -> None:
    targets = [target for config in scrape_job("dit-api")["static_configs"] for target in config["targets"]]
    assert targets == [f"api:{container_environment('api')['DIT_PORT']}"]
    assert scrape_job("dit-api").get("metrics_path", "/metrics") == "/metrics"


def test_prometheus_finds_every_worker_replica_by_dns() -> None:
    (discovery,) = scrape_job("dit-worker")["dns_sd_configs"]
    worker = load_compose()["services"]["worker"]
    assert discovery["names"] == ["worker"] and discovery["type"] == "A"
    port = container_environment("worker")["DIT_METRICS_PORT"]
    assert discovery["port"] == int(port) == DEFAULT_WORKER_METRICS_PORT
    assert port in [str(exposed) for exposed in worker["expose"]]
    # The worker must listen beyond its own loopback for Prometheus to reach it.
    assert container_environment("worker")["DIT_METRICS_HOST"] == "0.0.0.0"
    assert "DIT_WORKER_METRICS_URL" not in container_environment("api"), "workers are scraped directly"


def test_worker_image_serves_metrics_on_all_interfaces() -> None:
    environment = " ".join(of(WORKER_DOCKERFILE, "ENV"))
    assert "DIT_METRICS_HOST=0.0.0.0" in environment
    assert f"DIT_METRICS_PORT={DEFAULT_WORKER_METRICS_PORT}" in environment
    assert str(DEFAULT_WORKER_METRICS_PORT) in of(WORKER_DOCKERFILE, "EXPOSE")
    assert Settings().metrics_port == DEFAULT_WORKER_METRICS_PORT


def test_grafana_datasource_is_the_compose_prometheus() -> None:
    (datasource,) = yaml.safe_load((GRAFANA_DIR / "provisioning/datasources/prometheus.yml").read_text())[
        "datasources"
    ]
    assert datasource["type"] == "prometheus"
    assert datasource["url"] == f"http://prometheus:{PROMETHEUS_PORT}"
    ports = load_compose()["services"]["prometheus"]["ports"]
    assert any(str(port).endswith(f":{PROMETHEUS_PORT}") for port in ports)
    assert bind_mounts("grafana")["/etc/grafana/provisioning"] == "./docker/grafana/provisioning"


def test_grafana_loads_the_shipped_dashboards() -> None:
    (provider,) = yaml.safe_load((GRAFANA_DIR / "provisioning/dashboards/dit-serve.yml").read_text())[
        "providers"
    ]
    assert bind_mounts("grafana")[provider["options"]["path"]] == "./docker/grafana/dashboards"
    home = container_environment("grafana")["GF_DASHBOARDS_DEFAULT_HOME_DASHBOARD_PATH"]
    assert home.startswith(provider["options"]["path"] + "/")
    assert (GRAFANA_DIR / "dashboards" / Path(home).name).is_file()


@pytest.mark.parametrize("dashboard_file", DASHBOARD_FILES, ids=[path.name for path in DASHBOARD_FILES])
def test_dashboard_panels_use_the_provisioned_datasource(dashboard_file: Path) -> None:
    (datasource,) = yaml.safe_load((GRAFANA_DIR / "provisioning/datasources/prometheus.yml").read_text())[
        "datasources"
    ]
    dashboard = json.loads(dashboard_file.read_text())
    assert dashboard["uid"] and dashboard["title"]
    queried = [panel for panel in dashboard["panels"] if panel["type"] != "row"]
    assert len(queried) >= 12
    ids = [panel["id"] for panel in dashboard["panels"]]
    assert len(ids) == len(set(ids)), "panel ids must be unique"
    for panel in queried:
        assert panel["datasource"]["uid"] == datasource["uid"], panel["title"]
        assert panel["targets"] and all(target["expr"].strip() for target in panel["targets"]), panel["title"]
        assert panel.get("description"), f"{panel['title']} has no description"


def test_the_docs_describe_every_panel_with_its_query_and_every_alert() -> None:
    docs = ROOT / "docs" / "observability.md"
    readme = docs.read_text()
    for dashboard_file in DASHBOARD_FILES:
        for panel in json.loads(dashboard_file.read_text())["panels"]:
            if panel["type"] == "row":
                continue
            assert f"**{panel['title']}**" in readme, f"{docs.name} lacks the panel {panel['title']!r}"
            for target in panel["targets"]:
                in_table = "`" + target["expr"].replace("|", "\\|") + "`"  # as a Markdown table cell
                assert in_table in readme, f"{docs.name} lacks {panel['title']!r}'s query"
    rules = yaml.safe_load((PROMETHEUS_DIR / "alerts.yml").read_text())["groups"]
    for rule in (rule for group in rules for rule in group["rules"]):
        assert f"`{rule['alert']}`" in readme, f"{docs.name} lacks the alert {rule['alert']}"
