"""The Grafana dashboard's panels drawn from a real Prometheus with matplotlib, where no Grafana runs.

    python -m bench.dashboard render --prometheus http://127.0.0.1:9090 --minutes 30 --out dash.png
    python -m bench.dashboard demo --minutes 5 --out bench/results/dashboard.png

`render` evaluates every panel query of docker/grafana/dashboards/*.json over a time range through
Prometheus' range-query API and lays the panels out on Grafana's 24-column grid (timeseries as lines,
the heatmap as an image). It is not Grafana's rendering: same queries and layout, plainer drawing.

`demo` makes something to draw: Redis (embedded unless REDIS_URL), `dit-serve api` and one
`dit-serve worker` serving the bundled image and video models, a Prometheus with the shipped scrape
jobs and alert rules, and a mixed open-loop load (images of 1-4 outputs, videos, refused requests,
a cancel now and then) for the given minutes; then it renders what Prometheus recorded.
"""

import argparse
import json
import math
import random
import re
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from bench.prometheus import PrometheusAPI, PrometheusServer
from bench.service import ServiceUnderTest, Settings, client_for
from dit_serve.embedded_redis import free_port
from models.bundled import IMAGE_MODEL_DIR, IMAGE_MODEL_NAME, VIDEO_MODEL_DIR, VIDEO_MODEL_NAME

DASHBOARD_DIR = Path(__file__).resolve().parents[1] / "docker" / "grafana" / "dashboards"
GRID_COLUMNS = 24
INCHES_PER_COLUMN = 0.75
INCHES_PER_GRID_ROW = 0.32
MAX_LEGEND_ENTRIES = 10
UNIT_SCALE = {"bytes": (1e-6, "MB"), "percentunit": (100.0, "%"), "s": (1.0, "s"), "reqps": (1.0, "req/s")}
WAIT_S = 60


def render_expr(expr: str, rate_interval: str) -> str:
    """A panel query with Grafana's interval variables filled in, as Grafana would send it."""
    return expr.replace("$__rate_interval", rate_interval).replace("$__interval", rate_interval)


def legend(template: str, labels: dict[str, str]) -> str:
    return re.sub(r"\{\{\s*(\w+)\s*\}\}", lambda m: labels.get(m.group(1), ""), template).strip()


def _draw_panel(
    ax: Any, panel: dict[str, Any], api: PrometheusAPI, span: tuple[float, float, float], rate: str
) -> None:
    start, end, step = span
    scale, unit = UNIT_SCALE.get(panel.get("fieldConfig", {}).get("defaults", {}).get("unit", ""), (1.0, ""))
    ax.set_title(panel["title"], fontsize=9, loc="left")
    ax.tick_params(labelsize=7)
    if panel["type"] == "heatmap":
        (target,) = panel["targets"]
        series = api.query_range(render_expr(target["expr"], rate), start, end, step)
        bounds = sorted(
            series, key=lambda s: math.inf if s["metric"]["le"] == "+Inf" else float(s["metric"]["le"])
        )
        if bounds:
            # buckets are cumulative: a cell holds the observations between its bound and the previous one
            cumulative = [[float(v) for _, v in s["values"]] for s in bounds]
            cells = [cumulative[0]] + [
                [max(0.0, hi - lo) for hi, lo in zip(upper, lower, strict=False)]
                for upper, lower in zip(cumulative[1:], cumulative, strict=False)
            ]
            minutes = [(t - end) / 60 for t, _ in bounds[0]["values"]]
            ax.imshow(cells, aspect="auto", origin="lower", cmap="Oranges",
                      extent=(minutes[0], minutes[-1], -0.5, len(bounds) - 0.5))  # fmt: skip
            ax.set_yticks(range(len(bounds)), [f"≤{s['metric']['le']}" for s in bounds], fontsize=6)
        ax.set_xlabel("minutes", fontsize=7)
        return
    lines = 0
    for target in panel["targets"]:
        for series in api.query_range(render_expr(target["expr"], rate), start, end, step):
            times = [(float(t) - end) / 60 for t, _ in series["values"]]
            values = [float(v) * scale for _, v in series["values"]]
            ax.plot(
                times, values, linewidth=1, label=legend(target.get("legendFormat", ""), series["metric"])
            )
            lines += 1
    if lines == 0:
        ax.text(0.5, 0.5, "no data", ha="center", va="center", transform=ax.transAxes, fontsize=8)
    elif lines <= MAX_LEGEND_ENTRIES:
        ax.legend(fontsize=6, loc="upper left")
    ax.set_ylabel(unit, fontsize=7)
    ax.set_xlabel("minutes", fontsize=7)


def render(api: PrometheusAPI, dashboard: Path, out: Path, start: float, end: float, rate: str) -> int:
    """Draw every panel of `dashboard` over [start, end]; returns how many panels were drawn."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    spec = json.loads(dashboard.read_text())
    panels = spec["panels"]
    rows = max(panel["gridPos"]["y"] + panel["gridPos"]["h"] for panel in panels)
    figure = plt.figure(figsize=(GRID_COLUMNS * INCHES_PER_COLUMN, rows * INCHES_PER_GRID_ROW))
    step = max(1.0, (end - start) / 200)
    drawn = 0
    for panel in panels:
        grid = panel["gridPos"]
        left, width = grid["x"] / GRID_COLUMNS, grid["w"] / GRID_COLUMNS
        bottom, height = 1 - (grid["y"] + grid["h"]) / rows, grid["h"] / rows
        if panel["type"] == "row":
            figure.text(0.005, bottom + height / 2, panel["title"], fontsize=12, weight="bold", va="center")
            continue
        # leave room for the title above and the tick labels below and to the left
        ax = figure.add_axes((left + 0.03, bottom + 0.2 * height, width - 0.04, 0.62 * height))
        _draw_panel(ax, panel, api, (start, end, step), rate)
        drawn += 1
    figure.suptitle(
        f"{spec['title']} — panel queries from Prometheus, drawn by matplotlib (not Grafana)", y=0.995
    )
    out.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(out, dpi=80)
    plt.close(figure)
    return drawn


# -- demo: a service under a mixed load, scraped by a real Prometheus ----------------------------------


def _labels(model_dir: Path) -> list[str]:
    return list(json.loads((model_dir / "model_index.json").read_text())["id2label"].values())


def drive(url: str, seconds: float, rate: float, seed: int = 0) -> dict[str, int]:
    """Open-loop arrivals for `seconds`: 75% images (1-4 outputs), 20% videos, 5% refused prompts.

    Every 30th arrival is canceled right after it is accepted. Returns how many of each ended how.
    """
    rng = random.Random(seed)
    images, videos = _labels(IMAGE_MODEL_DIR), _labels(VIDEO_MODEL_DIR)
    outcome: dict[str, int] = {}
    lock = threading.Lock()
    local = threading.local()

    def one(k: int, kind: str, body: dict[str, Any]) -> None:
        if not hasattr(local, "client"):
            local.client = client_for(url, WAIT_S + 30)
        response = local.client.post(f"/v1/{kind}", json=body)
        status = str(response.status_code)
        if response.status_code == 202:
            job_id = response.json()["id"]
            if k % 30 == 29:
                local.client.delete(f"/v1/jobs/{job_id}")
            while (job := local.client.get(f"/v1/jobs/{job_id}", params={"wait": WAIT_S}).json())[
                "status"
            ] in (
                "queued",
                "in_progress",
            ):
                pass
            status = job["status"]
        with lock:
            outcome[status] = outcome.get(status, 0) + 1

    start = time.monotonic()
    arrival, k = 0.0, 0
    with ThreadPoolExecutor(256) as pool:
        futures = []
        while (arrival := arrival + rng.expovariate(rate)) < seconds:
            time.sleep(max(0.0, start + arrival - time.monotonic()))
            draw = rng.random()
            if draw < 0.75:
                body: dict[str, Any] = {
                    "model": IMAGE_MODEL_NAME,
                    "prompt": rng.choice(images),
                    "n": rng.randint(1, 4),
                }
                futures.append(pool.submit(one, k, "images", body))
            elif draw < 0.95:
                futures.append(
                    pool.submit(one, k, "videos", {"model": VIDEO_MODEL_NAME, "prompt": rng.choice(videos)})
                )
            else:
                futures.append(
                    pool.submit(one, k, "images", {"model": IMAGE_MODEL_NAME, "prompt": "purple elephant"})
                )
            k += 1
        for future in futures:
            future.result()
    return outcome


def demo(minutes: float, rate: float, out: Path, scrape_interval: str) -> None:
    with tempfile.TemporaryDirectory(prefix="dit-dashboard-") as tmp:
        workdir = Path(tmp)
        metrics_port = free_port()
        models = [f"{IMAGE_MODEL_NAME}={IMAGE_MODEL_DIR}", f"{VIDEO_MODEL_NAME}={VIDEO_MODEL_DIR}"]
        settings = Settings(IMAGE_MODEL_DIR, 25, 4.0, 0, [], [], 16, 16, 20)
        env = {"DIT_MODELS": json.dumps(models), "DIT_METRICS_PORT": str(metrics_port)}
        service = ServiceUnderTest(settings, workdir, env).start()
        targets = {"dit-api": f"127.0.0.1:{service.port}", "dit-worker": f"127.0.0.1:{metrics_port}"}
        prometheus = PrometheusServer(workdir / "prometheus", targets, scrape_interval)
        try:
            start = time.time()
            print(f"driving {rate} arrivals/s for {minutes} min; prometheus at {prometheus.url}")
            outcome = drive(service.url, minutes * 60, rate)
            time.sleep(3 * float(scrape_interval.rstrip("s")))  # the last jobs' end, scraped
            drawn = render(prometheus, DASHBOARD_DIR / "dit-serve.json", out, start, time.time(), "1m")
            print(f"jobs by outcome: {outcome}; {drawn} panels drawn to {out}")
        finally:
            prometheus.stop()
            service.stop()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.dashboard", description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    draw = commands.add_parser("render", help="draw the dashboard from a running Prometheus")
    draw.add_argument("--prometheus", required=True, help="its URL, e.g. http://127.0.0.1:9090")
    draw.add_argument("--minutes", type=float, default=30.0, help="the time range, ending now")
    draw.add_argument("--rate-interval", default="1m", help="what Grafana's $__rate_interval stands for")
    draw.add_argument("--dashboard", type=Path, default=DASHBOARD_DIR / "dit-serve.json")
    draw.add_argument("--out", type=Path, required=True)
    run = commands.add_parser("demo", help="a bundled-model service under load, scraped, then drawn")
    run.add_argument("--minutes", type=float, default=5.0)
    run.add_argument("--rate", type=float, default=0.5, help="arrivals per second (open loop)")
    run.add_argument("--scrape-interval", default="5s")
    run.add_argument("--out", type=Path, required=True)
    args = parser.parse_args(argv)
    if args.command == "render":
        end = time.time()
        api = PrometheusAPI(args.prometheus)
        drawn = render(api, args.dashboard, args.out, end - args.minutes * 60, end, args.rate_interval)
        print(f"{drawn} panels drawn to {args.out}")
    else:
        demo(args.minutes, args.rate, args.out, args.scrape_interval)


if __name__ == "__main__":
    main()
