"""`dit-serve bench SCENARIO [ARGS...]`: run one of the benchmarks in bench/ with its own flags.

The benchmarks sit above the command line in the import layers (pyproject.toml: a benchmark starts
`dit-serve` processes and drives them), so this module only names them, and imports the one asked for
by name when it runs. A new scenario is one line in SCENARIOS.
"""

import argparse
import importlib
import importlib.util
import sys
from pathlib import Path

# scenario -> (module with a `main(argv)`, what it measures)
SCENARIOS: dict[str, tuple[str, str]] = {
    "service": ("bench.service", "the service over HTTP against naive and ideal DiTPipeline runs"),
    "burst": ("bench.burst", "16 requests posted at once, static and continuous, before and after"),
    "overload": ("bench.overload", "one key flooding the service, with and without admission control"),
    "batching": ("bench.compare_batching", "static against continuous batching at Poisson loads"),
    "mixed": ("bench.mixed", "images alone, then with videos on the same worker: the image p99 ratio"),
    "cache": ("bench.cache", "step caching: each policy's speed-up over none on the bundled models"),
    "lora": (
        "bench.lora",
        "16 rows with 4 LoRA adapters in one batch, against one adapter and separate batches",
    ),
}


def add_bench_parser(commands: argparse._SubParsersAction) -> None:
    bench = commands.add_parser(
        "bench",
        help="run a benchmark; `dit-serve bench SCENARIO --help` for its flags",
        description="\n".join(f"{name}: {what}" for name, (_, what) in SCENARIOS.items()),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    bench.add_argument("scenario", choices=list(SCENARIOS))
    bench.add_argument("args", nargs=argparse.REMAINDER, help="the scenario's own flags")


def run_bench(scenario: str, argv: list[str]) -> None:
    module_name, _ = SCENARIOS[scenario]
    # bench/ is a tool of the repository, not part of the installed package: run from a checkout (an
    # editable install), whose root holds it beside cli/.
    checkout = Path(__file__).resolve().parents[1]
    if importlib.util.find_spec("bench") is None and (checkout / "bench" / "__init__.py").is_file():
        sys.path.insert(0, str(checkout))
    if importlib.util.find_spec("bench") is None:
        raise SystemExit(
            "dit-serve bench runs the benchmarks in bench/, which ship with a checkout, not with the "
            "package: clone the repository and `pip install -e '.[worker,bench]'` there"
        )
    importlib.import_module(module_name).main(argv)
