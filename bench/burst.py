"""Bursts: many requests posted at once, against raw batched DiTPipeline, in one run: `dit-serve bench burst`.

A burst is `--burst` client threads that each post one job at the same moment over HTTP, wait for it
and download its PNG; on 2 CPU cores, where the API, the worker and the clients share the cores, the
posts take about 0.4 s to all arrive. Each batching mode (static, continuous) runs under each batch
policy (`before`: the fill window of earlier releases, a fixed DIT_MAX_WAIT_MS after the first job;
`after`: this release's defaults), each on a fresh service (`dit-serve api` + one `dit-serve worker` +
an embedded Redis), `--rounds` bursts each. The `ideal` run (bench/service.py) samples the same
requests in raw DiTPipeline batches of the burst's size, in this process, first.

Reported per mode and policy: images/s over all rounds, its ratio to ideal, and per burst the worker's
runs (sampling loops: a continuous run counts once however many jobs join it), takes (distinct
executions: static, one per batch; continuous, the first take and each join), and the spread of the
jobs' arrivals at the API.
"""

import argparse
import json
import random
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path

import httpx
from redis import Redis

from bench.service import (
    ServiceUnderTest,
    Settings,
    add_workload_flags,
    one_request,
    percentile,
    run_ideal,
)
from dit_serve.jobs import RecordField, record_key

MODES = ["static", "continuous"]
# Each policy is the worker's environment on top of the defaults. `before`: the window of earlier
# releases, DIT_MAX_WAIT_MS after the first job and not a moment longer.
POLICIES: dict[str, dict[str, str]] = {
    "before": {"DIT_BATCH_GAP_MS": "0", "DIT_MAX_FILL_MS": "0"},
    "after": {},
}
ROUND_PAUSE_S = 0.5  # between bursts, so one burst's stragglers never meet the next


@dataclass
class BurstRound:
    seconds: float  # from the posts' start to the last PNG downloaded
    runs: int  # the worker's sampling loops that ran the burst's jobs
    takes: int  # distinct executions (static: one per batch; continuous: the first take and each join)
    arrivals_s: list[float]  # each job's acceptance by the API, from the burst's start, sorted
    starts_s: list[float]  # each job's take by the worker, from the burst's start, sorted


@dataclass
class BurstResult:
    batching: str
    policy: str
    burst: int  # requests per burst
    rounds: int
    images_per_second: float
    ratio_to_ideal: float
    burst_p50_s: float  # a whole burst: its posts' start to its last PNG
    burst_max_s: float
    runs: list[int]  # per round
    takes: list[int]
    arrival_spread_s: list[float]  # per round: last acceptance minus the first
    detail: list[BurstRound] = field(default_factory=list)


def runs_of(intervals: list[tuple[float, float]]) -> int:
    """How many sampling loops ran jobs that held the worker over these (taken, completed) intervals:
    one worker runs one loop at a time, so jobs whose intervals overlap shared one."""
    runs, end = 0, float("-inf")
    for started, completed in sorted(intervals):
        if started > end:
            runs += 1
        end = max(end, completed)
    return runs


def burst_round(service: ServiceUnderTest, settings: Settings, burst: int, first: int) -> BurstRound:
    """Post `burst` jobs at once from as many threads, each waiting for its job and PNG."""
    gate = threading.Barrier(burst + 1)
    records: list[tuple[float, float, str]] = []

    def client(k: int) -> None:
        with httpx.Client(base_url=service.url, timeout=60) as http:
            gate.wait()
            records.append(one_request(http, settings, first + k))

    with ThreadPoolExecutor(burst) as pool:
        futures = [pool.submit(client, k) for k in range(burst)]
        gate.wait()
        began, began_unix = time.perf_counter(), time.time()
        for future in futures:
            future.result()
        seconds = time.perf_counter() - began
    job_ids = [record[2] for record in records]
    fields = [RecordField.CREATED_AT, RecordField.STARTED_AT, RecordField.COMPLETED_AT, RecordField.EXECUTION]
    with Redis.from_url(service.redis_url) as redis, redis.pipeline() as pipe:
        for job_id in job_ids:
            pipe.hmget(record_key(job_id), fields)
        rows = [(float(c), float(s), float(d), e) for c, s, d, e in pipe.execute()]
    return BurstRound(
        seconds=round(seconds, 3),
        runs=runs_of([(started, completed) for _, started, completed, _ in rows]),
        takes=len({execution for *_, execution in rows}),
        arrivals_s=sorted(round(created - began_unix, 3) for created, *_ in rows),
        starts_s=sorted(round(started - began_unix, 3) for _, started, *_ in rows),
    )


def run_bursts(
    settings: Settings, workdir: Path, env: dict[str, str], burst: int, rounds: int
) -> list[BurstRound]:
    """`rounds` bursts on a fresh service."""
    service = ServiceUnderTest(settings, workdir, env, embedded_redis=True).start()
    try:
        with httpx.Client(base_url=service.url, timeout=60) as http:
            one_request(http, settings, 0)  # warm-up: first batch, first PNG
        done = []
        for index in range(rounds):
            time.sleep(ROUND_PAUSE_S)
            done.append(burst_round(service, settings, burst, index * burst))
        return done
    finally:
        service.stop()


def run(settings: Settings, burst: int, rounds: int, modes: list[str], policies: list[str]) -> dict:
    """The ideal run, then every mode under every policy; returns the JSON record."""
    rng = random.Random(settings.seed)
    labels = json.loads((settings.model_dir / "model_index.json").read_text()).get("id2label", {})
    settings.requests = burst * rounds
    settings.batch = burst
    settings.labels = [rng.randrange(len(labels)) for _ in range(settings.requests)]
    ideal = run_ideal(settings)
    print(json.dumps(asdict(ideal)), flush=True)
    results = []
    for mode in modes:
        for policy in policies:
            settings.batching = mode
            with tempfile.TemporaryDirectory(prefix="dit-burst-") as tmp:
                done = run_bursts(settings, Path(tmp), POLICIES[policy], burst, rounds)
            seconds = sum(r.seconds for r in done)
            throughput = burst * rounds / seconds
            result = BurstResult(
                batching=mode,
                policy=policy,
                burst=burst,
                rounds=rounds,
                images_per_second=round(throughput, 3),
                ratio_to_ideal=round(throughput / ideal.images_per_second, 3),
                burst_p50_s=round(percentile([r.seconds for r in done], 50), 3),
                burst_max_s=max(r.seconds for r in done),
                runs=[r.runs for r in done],
                takes=[r.takes for r in done],
                arrival_spread_s=[round(r.arrivals_s[-1] - r.arrivals_s[0], 3) for r in done],
                detail=done,
            )
            results.append(result)
            print(json.dumps({k: v for k, v in asdict(result).items() if k != "detail"}), flush=True)
    return {"ideal": asdict(ideal), "results": [asdict(r) for r in results]}


def format_table(record: dict) -> str:
    ideal = record["ideal"]
    lines = [
        "| batching | policy | images/s | ÷ ideal | burst p50 s | runs per burst | takes per burst "
        "| arrival spread s |",
        "|---|---|---|---|---|---|---|---|",
        f"| ideal: DiTPipeline batches of {ideal['parameter']} | — | {ideal['images_per_second']} | 1.00 "
        "| — | — | — | — |",
    ]
    for r in record["results"]:
        spread = max(r["arrival_spread_s"])
        cells = [r["batching"], r["policy"], r["images_per_second"], f"{r['ratio_to_ideal']:.2f}"]
        cells += [r["burst_p50_s"], ", ".join(map(str, r["runs"])), ", ".join(map(str, r["takes"]))]
        cells += [f"≤ {spread}"]
        lines.append("| " + " | ".join(str(cell) for cell in cells) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="dit-serve bench burst", description=__doc__.splitlines()[0])
    add_workload_flags(parser, "unused: the requests are --burst x --rounds")
    parser.add_argument("--burst", type=int, default=16, help="requests posted at once")
    parser.add_argument("--rounds", type=int, default=3, help="bursts per mode and policy")
    parser.add_argument("--modes", nargs="+", choices=MODES, default=MODES, help="batching modes")
    parser.add_argument("--policies", nargs="+", choices=list(POLICIES), default=list(POLICIES))
    parser.add_argument("--max-batch", type=int, default=16, help="the worker's --max-batch")
    parser.add_argument("--max-wait-ms", type=int, default=20, help="the worker's --max-wait-ms")
    parser.add_argument("--json", type=Path, default=Path("bench/results/burst.json"))
    args = parser.parse_args(argv)
    settings = Settings.for_service_only(args)
    record = run(settings, args.burst, args.rounds, args.modes, args.policies)
    record["settings"] = {key: str(value) for key, value in vars(args).items()}
    print(format_table(record))
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(record, indent=2))


if __name__ == "__main__":
    main()
