"""Every metric the shipped dashboard and alert rules query has samples from the first scrape.

A labelled counter has no sample until its first `.labels(...)`, so a panel over a series that only
appears with the first cancel or the first lost job reads "No data" (and `increase()` misses that
first event). Here a real API and a real worker serve tiny models, no job is ever sent, and the first
scrape of each must already carry every metric named in the PromQL of the shipped Grafana dashboards
and Prometheus alert rules, with the known label sets at 0.
"""

import json
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from dit_serve.embedded_redis import free_port
from dit_serve.reaping import REAPED_FAILED, REAPED_REQUEUED, REAPED_TIMED_OUT
from tests.conftest import metric, running_service, scrape

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]
DASHBOARDS = sorted((ROOT / "docker" / "grafana" / "dashboards").glob("*.json"))
ALERT_RULES = ROOT / "docker" / "prometheus" / "alerts.yml"
# What DELETE /v1/jobs/{id} counts in dit_cancels_total's `outcome` (app/routes/jobs.py).
CANCEL_OUTCOMES = ("canceled", "cancel_requested")
# Series Prometheus writes itself for every scrape target; no /metrics page carries them.
PROMETHEUS_SYNTHETIC = {
    "up",
    "scrape_duration_seconds",
    "scrape_samples_scraped",
    "scrape_samples_post_metric_relabeling",
    "scrape_series_added",
}
# PromQL words that look like metric names: binary operators, modifiers and grouping keywords.
PROMQL_KEYWORDS = {
    "and", "or", "unless", "bool", "offset", "by", "without", "on", "ignoring", "group_left",
    "group_right", "atan2", "inf", "nan",
}  # fmt: skip

STRING = re.compile(r'"(?:[^"\\]|\\.)*"|\'(?:[^\'\\]|\\.)*\'|`[^`]*`')
MATCHERS_OR_RANGE = re.compile(r"\{[^}]*\}|\[[^\]]*\]")
GROUPING = re.compile(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)")
IDENTIFIER = re.compile(r"(?<![\w.:])([a-zA-Z_:][\w:]*+)(?!\s*\()")


def metric_names(expr: str) -> set[str]:
    """The metric names a PromQL expression selects: neither functions, keywords nor label names."""
    for pattern in (STRING, MATCHERS_OR_RANGE, GROUPING):
        expr = pattern.sub(" ", expr)
    return {name for name in IDENTIFIER.findall(expr) if name.lower() not in PROMQL_KEYWORDS}


def exprs(node: Any) -> Iterator[str]:
    """Every "expr" string anywhere in a dashboard's JSON: panels' queries, rows' panels included."""
    if isinstance(node, dict):
        for key, value in node.items():
            if key == "expr" and isinstance(value, str):
                yield value
            else:
                yield from exprs(value)
    elif isinstance(node, list):
        for item in node:
            yield from exprs(item)


def queried_metrics() -> dict[str, str]:
    """Every metric name the shipped dashboards and alert rules query, with where it is queried."""
    where: dict[str, str] = {}
    for dashboard in DASHBOARDS:
        for expr in exprs(json.loads(dashboard.read_text())):
            for name in metric_names(expr):
                where.setdefault(name, f"{dashboard.name}: {expr}")
    for group in yaml.safe_load(ALERT_RULES.read_text())["groups"]:
        for rule in group["rules"]:
            for name in metric_names(rule["expr"]):
                where.setdefault(name, f"{ALERT_RULES.name} {rule.get('alert')}: {rule['expr']}")
    return where


def test_metric_names_are_parsed_out_of_promql() -> None:
    """The parser finds selected metrics and leaves out functions, label names, strings and keywords."""
    expr = (
        'label_replace(max by (model) (increase(dit_a_total{outcome="failed"}[$__rate_interval])), '
        '"code", "worker_lost", "", "") / on(model) group_left sum without (le) (dit_b_bucket offset 5m) '
        "> bool 0.5 and histogram_quantile(0.95, rate(dit_c_bucket[5m])) or up{job='x'} == 1"
    )
    assert metric_names(expr) == {"dit_a_total", "dit_b_bucket", "dit_c_bucket", "up"}
    assert len(queried_metrics()) > len(PROMETHEUS_SYNTHETIC), "no query was parsed out of the files"


def test_every_queried_metric_has_samples_before_any_job(
    redis_url: str, model_dirs: dict[str, Path], tmp_path: Path
) -> None:
    """An idle service's first scrape carries every queried metric; cancels and lost jobs at 0."""
    worker_port = free_port()
    models = {"img": model_dirs["img"], "vid": model_dirs["vid"]}
    with running_service(redis_url, tmp_path, models, DIT_METRICS_PORT=str(worker_port)) as svc:
        samples = scrape(f"{svc.base_url}/metrics") | scrape(f"http://127.0.0.1:{worker_port}/metrics")

    present = {name for name, _ in samples}
    missing = {
        name: where
        for name, where in queried_metrics().items()
        if name not in PROMETHEUS_SYNTHETIC and name not in present
    }
    assert not missing, "queried but without a sample before the first job:\n" + "\n".join(
        f"  {name}  ({where})" for name, where in sorted(missing.items())
    )
    for model in models:
        for outcome in CANCEL_OUTCOMES:
            assert metric(samples, "dit_cancels_total", model=model, outcome=outcome) == 0
        for outcome in (REAPED_REQUEUED, REAPED_FAILED, REAPED_TIMED_OUT):
            assert metric(samples, "dit_jobs_reaped_total", model=model, outcome=outcome) == 0
