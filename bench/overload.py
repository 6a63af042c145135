"""Overload on loopback, in one run: `python -m bench.overload`.

One API key (A) floods the service at `--flood` times its measured capacity while a second key (B)
sends one job every `--interval` seconds and waits for it. Three phases, each on a fresh service
(`dit-serve api` + one `dit-serve worker` + an embedded Redis):

- idle: only B sends, to the protected service; its latency here is the yardstick;
- protected: auth on, A's key with a quota (`--max-queued`) and a rate limit, the queue capped
  (`--max-queue-depth`), fair share across keys;
- unprotected: today's behaviour before admission control: `--auth off` and no queue cap, so A and
  B are one anonymous client to a first-in, first-out queue.

It reports B's latency (POST to completed), A's answers by status and error code, the deepest the
queue got, and every 5xx. Before the first phase's load, on its service, the capacity (jobs/s) is
measured with a burst of jobs posted at once and awaited, and A's flood rate is set from it.
"""

import argparse
import json
import random
import tempfile
import threading
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path

import httpx
from redis import Redis
from rq import Queue

from bench.service import MODEL_NAME, ServiceUnderTest, Settings, add_workload_flags, percentile
from dit_serve.jobs import queue_name
from dit_serve.keys import create_key

WAIT_S = 60
DEPTH_SAMPLE_S = 0.25
FLOOD_THREADS = 32


@dataclass
class Phase:
    name: str
    b_jobs: int = 0
    b_p50_s: float = 0.0
    b_p99_s: float = 0.0
    b_max_s: float = 0.0
    b_unfinished: int = 0  # B's jobs not completed by the end of the drain
    b_post_p99_s: float = 0.0  # the POST alone (how long the API took to accept)
    b_queued_p99_s: float = 0.0  # accepted to started, from the job (how long it waited for a worker)
    a_sent: int = 0
    a_answers: dict[str, int] = field(default_factory=dict)  # "202", "429 rate_limited", ...
    max_queue_depth: int = 0
    server_errors: int = 0  # 5xx answers to A or B


def _job(k: int, steps: int, guidance: float) -> dict[str, object]:
    return {
        "model": MODEL_NAME,
        "class_labels": [k % 4],
        "seed": k,
        "num_inference_steps": steps,
        "guidance_scale": guidance,
    }


def measure_capacity(service: ServiceUnderTest, settings: Settings, jobs: int, secret: str | None) -> float:
    """Jobs/s the service completes when it always has work: `jobs` posted at once, all awaited."""
    headers = {"Authorization": f"Bearer {secret}"} if secret else {}
    with httpx.Client(base_url=service.url, timeout=WAIT_S + 30, headers=headers) as client:
        warm = client.post("/v1/images", json=_job(0, settings.steps, settings.guidance)).json()["id"]
        client.get(f"/v1/jobs/{warm}", params={"wait": WAIT_S})
        start = time.perf_counter()
        ids = [
            client.post("/v1/images", json=_job(k, settings.steps, settings.guidance)).json()["id"]
            for k in range(jobs)
        ]
        for job_id in ids:
            while client.get(f"/v1/jobs/{job_id}", params={"wait": WAIT_S}).json()["status"] != "completed":
                pass
        return jobs / (time.perf_counter() - start)


class Load:
    """A's open-loop flood and B's periodic jobs against one service, with the queue depth sampled."""

    def __init__(self, service: ServiceUnderTest, settings: Settings, keys: dict[str, str | None]):
        self.service, self.settings = service, settings
        self.headers = {
            name: {"Authorization": f"Bearer {secret}"} if secret else {} for name, secret in keys.items()
        }
        self.answers: Counter[str] = Counter()
        self.b_latencies: list[float] = []
        self.b_posts: list[float] = []
        self.b_queued: list[float] = []
        self.b_unfinished = 0
        self.server_errors = 0
        self.max_depth = 0
        self.lock = threading.Lock()
        self.stop = threading.Event()

    def _count(self, status: int, code: str | None) -> None:
        with self.lock:
            self.answers[f"{status} {code}" if code else str(status)] += 1
            self.server_errors += status >= 500

    def flood(self, rate: float, seconds: float, seed: int) -> int:
        """A posts at `rate` per second (Poisson arrivals) for `seconds`, never waiting for its jobs."""
        rng = random.Random(seed)
        client = httpx.Client(base_url=self.service.url, timeout=30, headers=self.headers["A"])

        def post(k: int) -> None:
            try:
                response = client.post(
                    "/v1/images", json=_job(k, self.settings.steps, self.settings.guidance)
                )
            except httpx.HTTPError:
                self._count(0, "connection_error")
                return
            code = response.json().get("error", {}).get("code") if response.status_code >= 400 else None
            self._count(response.status_code, code)

        sent, start, arrival = 0, time.perf_counter(), 0.0
        with ThreadPoolExecutor(FLOOD_THREADS) as pool:
            while True:
                arrival += rng.expovariate(rate)
                if arrival > seconds:
                    break
                time.sleep(max(0.0, start + arrival - time.perf_counter()))
                pool.submit(post, sent)
                sent += 1
        client.close()
        return sent

    def single_jobs(self, interval_s: float, seconds: float, drain_s: float) -> None:
        """B sends one job every interval_s for `seconds`, each awaited in its own thread."""

        def one(k: int) -> None:
            with httpx.Client(base_url=self.service.url, timeout=WAIT_S + 30, headers=self.headers["B"]) as c:
                began = time.perf_counter()
                response = c.post(
                    "/v1/images", json=_job(10_000 + k, self.settings.steps, self.settings.guidance)
                )
                if response.status_code >= 500:
                    with self.lock:
                        self.server_errors += 1
                response.raise_for_status()
                posted = time.perf_counter() - began
                job_id = response.json()["id"]
                deadline = began + seconds + drain_s
                while time.perf_counter() < deadline:
                    job = c.get(f"/v1/jobs/{job_id}", params={"wait": min(WAIT_S, 5)}).json()
                    if job["status"] == "completed":
                        with self.lock:
                            self.b_latencies.append(time.perf_counter() - began)
                            self.b_posts.append(posted)
                            self.b_queued.append(job["started_at"] - job["created_at"])
                        return
                with self.lock:
                    self.b_unfinished += 1

        count = int(seconds / interval_s)
        with ThreadPoolExecutor(count) as pool:
            start = time.perf_counter()
            for k in range(count):
                time.sleep(max(0.0, start + k * interval_s - time.perf_counter()))
                pool.submit(one, k)

    def sample_depth(self) -> None:
        redis = Redis.from_url(self.service.redis_url)
        key = Queue(queue_name(MODEL_NAME), connection=redis).key
        while not self.stop.wait(DEPTH_SAMPLE_S):
            self.max_depth = max(self.max_depth, int(redis.llen(key)))  # type: ignore[arg-type]


def start_service(name: str, settings: Settings, args: argparse.Namespace, workdir: Path) -> ServiceUnderTest:
    """A fresh service for phase `name`: the protected settings, or (unprotected) today's defaults."""
    protected = name != "unprotected"  # the idle yardstick runs with the protected settings
    env = {
        "DIT_AUTH": "on" if protected else "off",
        "DIT_MAX_QUEUE_DEPTH": str(args.max_queue_depth if protected else 0),
    }
    return ServiceUnderTest(settings, workdir, env, embedded_redis=True).start()


def _secret(service: ServiceUnderTest, name: str, **limits: object) -> str | None:
    """A new key's secret on a service with auth on; None when auth is off."""
    if service.env["DIT_AUTH"] == "off":
        return None
    return create_key(Redis.from_url(service.redis_url), name, **limits)[1]  # type: ignore[arg-type]


def drive(
    name: str, service: ServiceUnderTest, settings: Settings, args: argparse.Namespace, flood_rate: float
) -> Phase:
    """B's jobs, and (except when idle) A's flood, against `service`; what B and A saw."""
    keys = {
        "A": _secret(service, "flooder", max_queued=args.max_queued, rate_per_min=args.rate_per_min),
        "B": _secret(service, "steady"),
    }
    load = Load(service, settings, keys)
    sampler = threading.Thread(target=load.sample_depth, daemon=True)
    sampler.start()
    b = threading.Thread(target=load.single_jobs, args=(args.interval, args.seconds, args.drain))
    b.start()
    sent = load.flood(flood_rate, args.seconds, settings.seed) if name != "idle" else 0
    b.join()
    load.stop.set()
    latencies = load.b_latencies or [float("nan")]
    return Phase(
        name=name,
        b_jobs=len(load.b_latencies),
        b_p50_s=round(percentile(latencies, 50), 3),
        b_p99_s=round(percentile(latencies, 99), 3),
        b_max_s=round(max(latencies), 3),
        b_unfinished=load.b_unfinished,
        b_post_p99_s=round(percentile(load.b_posts or [float("nan")], 99), 3),
        b_queued_p99_s=round(percentile(load.b_queued or [float("nan")], 99), 3),
        a_sent=sent,
        a_answers=dict(sorted(load.answers.items())),
        max_queue_depth=load.max_depth,
        server_errors=load.server_errors,
    )


def format_table(phases: list[Phase], capacity: float, flood_rate: float) -> str:
    lines = [
        f"capacity {capacity:.2f} jobs/s; A floods at {flood_rate:.2f} jobs/s",
        "",
        "| phase | B jobs | B p50 s | B p99 s | B max s | B unfinished | A sent | A answers | max queue "
        "| 5xx |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for p in phases:
        answers = ", ".join(f"{code}: {count}" for code, count in p.a_answers.items()) or "-"
        lines.append(
            f"| {p.name} | {p.b_jobs} | {p.b_p50_s} | {p.b_p99_s} | {p.b_max_s} | {p.b_unfinished} | "
            f"{p.a_sent} | {answers} | {p.max_queue_depth} | {p.server_errors} |"
        )
    idle = [p.b_p99_s for p in phases if p.name == "idle"]
    for p in phases:
        if idle and p.name != "idle":
            lines.append(f"{p.name}: B's p99 is {p.b_p99_s / idle[0]:.2f}x its p99 on the idle service")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.overload", description=__doc__.splitlines()[0])
    add_workload_flags(parser, "jobs in the capacity burst")
    parser.add_argument("--flood", type=float, default=4.0, help="A's rate, in multiples of capacity")
    parser.add_argument("--interval", type=float, default=2.0, help="seconds between B's jobs")
    parser.add_argument("--seconds", type=float, default=60.0, help="how long A and B send, per phase")
    parser.add_argument("--drain", type=float, default=120.0, help="how long B's last jobs may take after")
    parser.add_argument("--max-batch", type=int, default=16, help="the worker's --max-batch")
    parser.add_argument("--max-wait-ms", type=int, default=20, help="the worker's --max-wait-ms")
    parser.add_argument("--batching", choices=["static", "continuous"], default="static")
    parser.add_argument("--max-queue-depth", type=int, default=128, help="protected: the queue cap")
    parser.add_argument("--max-queued", type=int, default=64, help="protected: A's quota")
    parser.add_argument(
        "--rate-per-min", type=int, default=None, help="protected: A's rate limit (default: 2x capacity)"
    )
    parser.add_argument("--phases", nargs="+", default=["idle", "protected", "unprotected"])
    parser.add_argument("--json", type=Path, default=Path("bench/results/overload.json"))
    args = parser.parse_args(argv)
    settings = Settings.for_service_only(args, batching=args.batching)
    phases: list[Phase] = []
    capacity = flood_rate = 0.0
    with tempfile.TemporaryDirectory(prefix="dit-overload-") as tmp:
        for name in args.phases:
            (Path(tmp) / name).mkdir()
            service = start_service(name, settings, args, Path(tmp) / name)
            try:
                if not capacity:  # measured once, on the first phase's service before its load
                    capacity = measure_capacity(service, settings, args.requests, _secret(service, "burst"))
                    flood_rate = args.flood * capacity
                    args.rate_per_min = args.rate_per_min or max(1, round(2 * capacity * 60))
                    print(
                        json.dumps(
                            {"capacity_jobs_per_s": round(capacity, 3), "flood_per_s": round(flood_rate, 3)}
                        )
                    )
                phases.append(drive(name, service, settings, args, flood_rate))
            finally:
                service.stop()
            print(json.dumps(asdict(phases[-1])), flush=True)
    print(format_table(phases, capacity, flood_rate))
    args.json.parent.mkdir(parents=True, exist_ok=True)
    record = {
        "settings": {k: str(v) for k, v in vars(args).items()},
        "capacity_jobs_per_s": capacity,
        "flood_per_s": flood_rate,
        "phases": [asdict(p) for p in phases],
    }
    args.json.write_text(json.dumps(record, indent=2))


if __name__ == "__main__":
    main()
