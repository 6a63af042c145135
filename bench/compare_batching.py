"""Static against continuous batching at the same Poisson loads, interleaved: bench.compare_batching.

The two modes run one after the other in every repeat, in alternating order (static first in even
repeats, continuous first in odd ones), each on a fresh service (API, worker, Redis) and the same
arrival sequence, so a machine whose speed drifts over minutes drifts under both alike. Reported per
mode and rate: throughput and p50/p99 latency of every repeat, and their medians.
"""

import argparse
import json
import random
import statistics
import tempfile
from dataclasses import asdict, replace
from pathlib import Path

import httpx

from bench.service import Result, ServiceUnderTest, Settings, add_workload_flags, one_request, run_poisson

MODES = ("static", "continuous")


def run(settings: Settings, rates: list[float], repeats: int) -> dict[str, dict[float, list[Result]]]:
    rng = random.Random(settings.seed)
    labels = json.loads((settings.model_dir / "model_index.json").read_text()).get("id2label", {})
    settings.labels = [rng.randrange(len(labels)) for _ in range(settings.requests)]
    results: dict[str, dict[float, list[Result]]] = {mode: {rate: [] for rate in rates} for mode in MODES}
    for repeat in range(repeats):
        for mode in MODES if repeat % 2 == 0 else MODES[::-1]:
            with tempfile.TemporaryDirectory(prefix="dit-bench-") as tmp:
                service = ServiceUnderTest(replace(settings, batching=mode), Path(tmp)).start()
                try:
                    with httpx.Client(base_url=service.url, timeout=60) as client:
                        one_request(client, settings, 0)  # warm-up
                    for rate in rates:
                        result = run_poisson(service, settings, rate)
                        results[mode][rate].append(result)
                        print(json.dumps({"repeat": repeat, "batching": mode, **asdict(result)}), flush=True)
                finally:
                    service.stop()
    return results


def format_table(results: dict[str, dict[float, list[Result]]]) -> str:
    lines = [
        "| arrivals/s | batching | images/s, each repeat | p50 s, each | p99 s, each | median p99 s |",
        "|---|---|---|---|---|---|",
    ]
    for rate in next(iter(results.values())):
        for mode in MODES:
            runs = results[mode][rate]
            cells = [
                f"{rate:g}",
                mode,
                ", ".join(f"{r.images_per_second:.2f}" for r in runs),
                ", ".join(f"{r.p50_s:.3f}" for r in runs),
                ", ".join(f"{r.p99_s:.3f}" for r in runs),
                f"{statistics.median(r.p99_s for r in runs):.3f}",
            ]
            lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m bench.compare_batching", description=__doc__.splitlines()[0]
    )
    add_workload_flags(parser, "requests per mode, rate and repeat")
    parser.add_argument("--rates", type=float, nargs="+", required=True, help="Poisson arrivals/s")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--max-batch", type=int, default=16)
    parser.add_argument("--max-wait-ms", type=int, default=20, help="static batching's fill wait")
    parser.add_argument("--json", type=Path, default=Path("bench/results/batching.json"))
    args = parser.parse_args(argv)
    settings = Settings.for_service_only(args)
    results = run(settings, args.rates, args.repeats)
    print(format_table(results))
    args.json.parent.mkdir(parents=True, exist_ok=True)
    record = {
        "settings": {key: str(value) for key, value in vars(args).items()},
        "results": {
            mode: {str(rate): [asdict(r) for r in runs] for rate, runs in by_rate.items()}
            for mode, by_rate in results.items()
        },
    }
    args.json.write_text(json.dumps(record, indent=2))


if __name__ == "__main__":
    main()
