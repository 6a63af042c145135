"""The service against what a user would build instead, in one run: `python -m bench.service`.

Same model, steps, guidance and samples throughout:
- naive: one `DiTPipeline` call per request, one request at a time, PNG-encoded (a plain web handler);
- ideal: the same samples in raw `DiTPipeline` batches (no HTTP, queue or storage): what the hardware
  does with this model;
- service: `dit-serve api` + `dit-serve worker` + Redis (an embedded one unless REDIS_URL is set),
  started here as child processes, driven over HTTP by closed-loop clients at each concurrency (each
  posts a job, waits for it, downloads the PNG, repeats) and by open-loop Poisson arrivals at
  fractions of the saturated throughput.

Latency is per request, from the client's POST to its PNG downloaded (naive: one pipeline call and
the PNG encode; ideal: the whole batch it was in). Clients wait for a job with one
`GET /v1/jobs/{id}?wait=60`, which answers when the job ends, so they cost no polling; the server-side
time from acceptance to completion is reported as well.
"""

import argparse
import io
import json
import os
import random
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import httpx

from dit_serve.embedded_redis import EmbeddedRedis, free_port
from dit_serve.jobs import KEY_PREFIX

MODEL_NAME = "bench"
WAIT_S = 60  # each GET /v1/jobs/{id}?wait= answers when the job ends (or after this long)
START_TIMEOUT_S = 120.0
REQUEST_TIMEOUT_S = 600.0


@dataclass
class Result:
    scenario: str  # naive | ideal | closed | poisson
    parameter: float  # concurrency (closed), arrival rate per s (poisson), batch (ideal), 1 (naive)
    requests: int
    seconds: float
    images_per_second: float
    p50_s: float
    p95_s: float
    p99_s: float
    server_p50_s: float | None = None  # acceptance to completion, from the job records
    batches: int | None = None  # distinct worker executions (service)


@dataclass
class Settings:
    model_dir: Path
    steps: int
    guidance: float
    requests: int
    concurrency: list[int]
    poisson: list[float]
    batch: int
    max_batch: int
    max_wait_ms: int
    batching: str = "static"
    rates: list[float] = field(default_factory=list)  # absolute Poisson rates; replace `poisson` when set
    seed: int = 0
    labels: list[int] = field(default_factory=list)
    model: str = MODEL_NAME  # the name the service serves model_dir under
    endpoint: str = "/v1/images"  # where its jobs are posted
    cache: str | None = None  # every request's `cache` field (a policy name or "auto"); None: not sent

    @classmethod
    def from_args(cls, args: argparse.Namespace, **rest: object) -> "Settings":
        """Settings from add_workload_flags' flags, plus the benchmark's own."""
        workload = {"model_dir": args.model_dir, "steps": args.steps, "guidance": args.guidance}
        return cls(**workload, requests=args.requests, **rest)  # type: ignore[arg-type]

    @classmethod
    def for_service_only(cls, args: argparse.Namespace, **rest: object) -> "Settings":
        """Settings of a benchmark that drives only the service (no naive or ideal run), from
        add_workload_flags' flags and --max-batch and --max-wait-ms."""
        batch = {"batch": args.max_batch, "max_batch": args.max_batch, "max_wait_ms": args.max_wait_ms}
        return cls.from_args(args, concurrency=[], poisson=[], **batch, **rest)


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    index = min(len(ordered) - 1, max(0, round(q / 100 * (len(ordered) - 1))))
    return ordered[index]


def _result(
    scenario: str, parameter: float, latencies: list[float], seconds: float, **extra: object
) -> Result:
    return Result(
        scenario=scenario,
        parameter=parameter,
        requests=len(latencies),
        seconds=round(seconds, 3),
        images_per_second=round(len(latencies) / seconds, 3),
        p50_s=round(percentile(latencies, 50), 4),
        p95_s=round(percentile(latencies, 95), 4),
        p99_s=round(percentile(latencies, 99), 4),
        **extra,  # type: ignore[arg-type]
    )


# -- (a) naive and (b) ideal: diffusers' DiTPipeline in this process -----------------------------------


def _pipeline(settings: Settings):  # type: ignore[no-untyped-def]
    import torch
    from diffusers import DiTPipeline

    torch.set_grad_enabled(False)
    pipe = DiTPipeline.from_pretrained(settings.model_dir)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _generators(seeds: list[int]):  # type: ignore[no-untyped-def]
    import torch

    return [torch.Generator().manual_seed(seed) for seed in seeds]


def run_naive(settings: Settings) -> Result:
    pipe = _pipeline(settings)
    pipe(class_labels=[0], num_inference_steps=2, guidance_scale=settings.guidance)  # warm-up
    latencies = []
    start = time.perf_counter()
    for k in range(settings.requests):
        began = time.perf_counter()
        image = pipe(
            class_labels=[settings.labels[k]],
            num_inference_steps=settings.steps,
            guidance_scale=settings.guidance,
            generator=_generators([settings.seed + k])[0],
        ).images[0]
        image.save(io.BytesIO(), format="PNG")
        latencies.append(time.perf_counter() - began)
    return _result("naive", 1, latencies, time.perf_counter() - start)


def run_ideal(settings: Settings) -> Result:
    pipe = _pipeline(settings)
    pipe(class_labels=[0] * settings.batch, num_inference_steps=2, guidance_scale=settings.guidance)
    latencies: list[float] = []
    start = time.perf_counter()
    for first in range(0, settings.requests, settings.batch):
        chunk = range(first, min(first + settings.batch, settings.requests))
        began = time.perf_counter()
        pipe(
            class_labels=[settings.labels[k] for k in chunk],
            num_inference_steps=settings.steps,
            guidance_scale=settings.guidance,
            generator=_generators([settings.seed + k for k in chunk]),
            output_type="np",
        )
        latencies += [time.perf_counter() - began] * len(chunk)
    return _result("ideal", settings.batch, latencies, time.perf_counter() - start)


# -- (c) the service over HTTP ---------------------------------------------------------------------


# Below uvicorn's keep-alive timeout (5 s): a client that reuses an idle connection just as the server
# closes it gets "connection reset by peer" (it ended a 240 s `bench mixed` run).
KEEPALIVE_EXPIRY_S = 2.0


def client_for(url: str, timeout: float = 60.0, **options: Any) -> httpx.Client:
    """An HTTP client of the service at `url` that drops idle connections before the server does."""
    limits = httpx.Limits(keepalive_expiry=KEEPALIVE_EXPIRY_S)
    return httpx.Client(base_url=url, timeout=timeout, limits=limits, **options)


class ServiceUnderTest:
    """Redis, `dit-serve api` and one `dit-serve worker`, as child processes of this one."""

    def __init__(
        self,
        settings: Settings,
        workdir: Path,
        env: dict[str, str] | None = None,
        embedded_redis: bool = False,
        models: dict[str, Path] | None = None,
    ):
        """With embedded_redis (or no REDIS_URL set), on a fresh Redis of its own. `models`: the
        served models by name (default: settings.model_dir as settings.model)."""
        self.workdir = workdir
        self.redis: EmbeddedRedis | None = None
        redis_url = None if embedded_redis else os.environ.get("REDIS_URL")
        if not redis_url:
            self.redis = EmbeddedRedis(workdir / "redis", persistent=False).start()
            redis_url = self.redis.url
        self.redis_url = redis_url
        self.port = free_port()
        served = models or {settings.model: settings.model_dir}
        self.env = {
            **os.environ,
            "REDIS_URL": redis_url,
            "DIT_PORT": str(self.port),
            "DIT_OUTPUT_DIR": str(workdir / "outputs"),
            "DIT_MODELS": json.dumps([f"{name}={path}" for name, path in served.items()]),
            "DIT_MAX_BATCH": str(settings.max_batch),
            "DIT_MAX_WAIT_MS": str(settings.max_wait_ms),
            "DIT_BATCHING": settings.batching,
            "DIT_LOG_LEVEL": "warning",
            "DIT_METRICS_PORT": "0",  # no port to collide with a service running beside the benchmark
            "DIT_AUTH": "off",  # the benchmark measures serving, not API keys
            **(env or {}),
        }
        self.processes: list[subprocess.Popen[bytes]] = []

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> "ServiceUnderTest":
        for command in ("api", "worker"):
            log = open(self.workdir / f"{command}.log", "ab")  # noqa: SIM115 - the child owns it
            self.processes.append(
                subprocess.Popen([sys.executable, "-m", "cli", command], env=self.env, stdout=log, stderr=log)
            )
        deadline = time.monotonic() + START_TIMEOUT_S
        while time.monotonic() < deadline:
            if any(process.poll() is not None for process in self.processes):
                self.stop()  # the other process too: a leftover API would serve a shared Redis on
                raise RuntimeError(f"the service did not start; see the logs in {self.workdir}")
            try:
                if httpx.get(f"{self.url}/readyz", timeout=1).status_code == 200:
                    return self
            except httpx.HTTPError:
                pass
            time.sleep(0.1)
        self.stop()
        raise RuntimeError(f"the service was not ready within {START_TIMEOUT_S} s; logs in {self.workdir}")

    def batches(self, job_ids: list[str]) -> int:
        """How many worker executions (batches) ran these jobs."""
        from redis import Redis

        with Redis.from_url(self.redis_url) as redis:
            return len({redis.hget(f"{KEY_PREFIX}:job:{job_id}", "execution") for job_id in job_ids})

    def stop(self) -> None:
        for process in self.processes:
            process.terminate()
        for process in self.processes:
            try:
                process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                process.kill()
        if self.redis:
            self.redis.stop()


def one_request(client: httpx.Client, settings: Settings, k: int) -> tuple[float, float, str]:
    """Post job k to settings' model, wait for it, download its first output (an image's PNG, a
    video's file); returns (latency, server latency, job id)."""
    began = time.perf_counter()
    body = {
        "model": settings.model,
        "class_labels": [settings.labels[k % len(settings.labels)]],
        "seed": settings.seed + k,
        "num_inference_steps": settings.steps,
        "guidance_scale": settings.guidance,
    }
    if settings.cache is not None:
        body["cache"] = settings.cache
    response = client.post(settings.endpoint, json=body)
    response.raise_for_status()
    job_id = response.json()["id"]
    while True:
        answer = client.get(f"/v1/jobs/{job_id}", params={"wait": WAIT_S}, timeout=WAIT_S + 30)
        if answer.is_error:
            raise RuntimeError(f"GET /v1/jobs/{job_id}: {answer.status_code} {answer.text}")
        job = answer.json()
        if job["status"] == "completed":
            break
        if job["status"] in ("failed", "canceled") or time.perf_counter() - began > REQUEST_TIMEOUT_S:
            raise RuntimeError(f"job {job_id} ended {job['status']}: {job.get('error')}")
    png = client.get(job["outputs"][0]["url"])
    png.raise_for_status()
    latency = time.perf_counter() - began
    return latency, job["completed_at"] - job["created_at"], job_id


def _service_result(
    scenario: str, parameter: float, records: list[tuple[float, float, str]], seconds: float, batches: int
) -> Result:
    latencies, server = [r[0] for r in records], [r[1] for r in records]
    server_p50 = round(percentile(server, 50), 4)
    return _result(scenario, parameter, latencies, seconds, server_p50_s=server_p50, batches=batches)


def run_closed(service: ServiceUnderTest, settings: Settings, concurrency: int) -> Result:
    """`concurrency` clients, each posting its next job when the last one's PNG arrives."""
    counter = iter(range(settings.requests))
    lock = threading.Lock()
    records: list[tuple[float, float, str]] = []

    def client_loop() -> None:
        with httpx.Client(base_url=service.url, timeout=60) as client:
            while True:
                with lock:
                    k = next(counter, None)
                if k is None:
                    return
                records.append(one_request(client, settings, k))

    start = time.perf_counter()
    with ThreadPoolExecutor(concurrency) as pool:
        for future in [pool.submit(client_loop) for _ in range(concurrency)]:
            future.result()
    seconds = time.perf_counter() - start
    return _service_result("closed", concurrency, records, seconds, service.batches([r[2] for r in records]))


def run_poisson(service: ServiceUnderTest, settings: Settings, rate: float) -> Result:
    """Open loop: jobs arrive at exponential intervals (mean 1/rate s) whatever the service does."""
    rng = random.Random(settings.seed + 1)
    records: list[tuple[float, float, str]] = []
    clients = threading.local()

    def request(k: int) -> None:
        if not hasattr(clients, "client"):
            clients.client = client_for(service.url)
        records.append(one_request(clients.client, settings, k))

    start = time.perf_counter()
    arrival = 0.0
    with ThreadPoolExecutor(max(64, settings.requests)) as pool:
        futures = []
        for k in range(settings.requests):
            arrival += rng.expovariate(rate)
            time.sleep(max(0.0, start + arrival - time.perf_counter()))
            futures.append(pool.submit(request, k))
        for future in futures:
            future.result()
    seconds = time.perf_counter() - start
    return _service_result(
        "poisson", round(rate, 3), records, seconds, service.batches([r[2] for r in records])
    )


# -- the run ----------------------------------------------------------------------------------------


def run(settings: Settings) -> list[Result]:
    rng = random.Random(settings.seed)
    labels = json.loads((settings.model_dir / "model_index.json").read_text()).get("id2label", {})
    settings.labels = [rng.randrange(len(labels)) for _ in range(settings.requests)]
    results = [run_naive(settings), run_ideal(settings)]
    for result in results:
        print(json.dumps(asdict(result)), flush=True)
    with tempfile.TemporaryDirectory(prefix="dit-bench-") as tmp:
        service = ServiceUnderTest(settings, Path(tmp)).start()
        try:
            with httpx.Client(base_url=service.url, timeout=60) as client:
                one_request(client, settings, 0)  # warm-up: first batch, first PNG
            for concurrency in settings.concurrency:
                results.append(run_closed(service, settings, concurrency))
                print(json.dumps(asdict(results[-1])), flush=True)
            saturated = max(r.images_per_second for r in results if r.scenario == "closed")
            rates = settings.rates or [fraction * saturated for fraction in settings.poisson]
            for rate in rates:
                results.append(run_poisson(service, settings, rate))
                print(json.dumps(asdict(results[-1])), flush=True)
        finally:
            service.stop()
    return results


def format_table(results: list[Result]) -> str:
    naive = next(r for r in results if r.scenario == "naive")
    ideal = next(r for r in results if r.scenario == "ideal")
    lines = [
        "| run | images/s | p50 s | p95 s | p99 s | server p50 s | batches | ÷ naive | ÷ ideal |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        name = {
            "naive": "naive: one DiTPipeline call per request",
            "ideal": f"ideal: DiTPipeline batches of {int(r.parameter)}",
            "closed": f"service, {int(r.parameter)} closed-loop clients",
            "poisson": f"service, Poisson arrivals at {r.parameter}/s",
        }[r.scenario]
        cells = [name, r.images_per_second, r.p50_s, r.p95_s, r.p99_s]
        cells += ["—" if r.server_p50_s is None else r.server_p50_s, "—" if r.batches is None else r.batches]
        cells += [f"{r.images_per_second / base.images_per_second:.2f}" for base in (naive, ideal)]
        lines.append("| " + " | ".join(str(cell) for cell in cells) + " |")
    return "\n".join(lines)


def plot(results: list[Result], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    closed = [r for r in results if r.scenario == "closed"]
    naive = next(r for r in results if r.scenario == "naive")
    ideal = next(r for r in results if r.scenario == "ideal")
    figure, (throughput, tail) = plt.subplots(1, 2, figsize=(10, 4))
    xs = [r.parameter for r in closed]
    throughput.plot(xs, [r.images_per_second for r in closed], "o-", label="service")
    throughput.axhline(naive.images_per_second, color="grey", linestyle="--", label="naive pipeline")
    throughput.axhline(
        ideal.images_per_second, color="black", linestyle=":", label=f"ideal batch {int(ideal.parameter)}"
    )
    throughput.set(xscale="log", xlabel="closed-loop clients", ylabel="images/s", title="throughput")
    tail.plot(xs, [r.p99_s for r in closed], "o-", label="service p99")
    tail.axhline(naive.p99_s, color="grey", linestyle="--", label="naive p99")
    tail.set(xscale="log", xlabel="closed-loop clients", ylabel="seconds", title="p99 latency")
    for axes in (throughput, tail):
        axes.minorticks_off()
        axes.set_xticks(xs, [str(int(x)) for x in xs])
        axes.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)


def add_workload_flags(parser: argparse.ArgumentParser, requests_help: str) -> None:
    """The model and the requests, shared by the benchmarks of the service."""
    from models.bundled import IMAGE_MODEL_DIR

    parser.add_argument("--model-dir", type=Path, default=IMAGE_MODEL_DIR, help="a DiTPipeline directory")
    parser.add_argument("--steps", type=int, default=25)
    parser.add_argument("--guidance", type=float, default=4.0)
    parser.add_argument("--requests", type=int, default=128, help=requests_help)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.service", description=__doc__.splitlines()[0])
    add_workload_flags(parser, "requests per scenario")
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 4, 16, 64])
    parser.add_argument(
        "--poisson", type=float, nargs="*", default=[0.5, 0.9], help="fractions of saturation"
    )
    parser.add_argument("--batch", type=int, default=16, help="the ideal run's batch size")
    parser.add_argument("--max-batch", type=int, default=16, help="the worker's --max-batch")
    parser.add_argument("--max-wait-ms", type=int, default=20, help="the worker's --max-wait-ms")
    parser.add_argument("--batching", choices=["static", "continuous"], default="static", help="the worker's")
    parser.add_argument(
        "--rates",
        type=float,
        nargs="*",
        default=[],
        help="Poisson arrivals/s (instead of --poisson fractions)",
    )
    parser.add_argument("--json", type=Path, default=Path("bench/results/service.json"))
    parser.add_argument("--plot", type=Path, default=Path("bench/results/service.png"))
    args = parser.parse_args(argv)
    settings = Settings.from_args(
        args,
        concurrency=args.concurrency,
        poisson=args.poisson,
        batch=args.batch,
        max_batch=args.max_batch,
        max_wait_ms=args.max_wait_ms,
        batching=args.batching,
        rates=args.rates,
    )
    results = run(settings)
    table = format_table(results)
    print(table)
    args.json.parent.mkdir(parents=True, exist_ok=True)
    record = {"settings": {k: str(v) for k, v in vars(args).items()}, "results": [asdict(r) for r in results]}
    args.json.write_text(json.dumps(record, indent=2))
    plot(results, args.plot)


if __name__ == "__main__":
    main()
