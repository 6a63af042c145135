"""Step caching's speed, side by side in one run: `dit-serve bench cache`.

For each bundled model, one batch (16 images, or 4 videos) through the service's sampler
(`worker.sampling.generate`: noise, the CFG loop, decode) with `cache: "none"` and with each policy,
the settings interleaved round by round so that load on the machine falls on all of them alike; the
median batch time gives outputs/s and the speed-up over none. The model's `auto` (its
cache_policy.json, from `dit-serve eval --cache --write-auto`) is marked.

`--families` also runs the real families' architectures (DiT-XL/2, PixArt-Σ, Wan 2.1, small configs
built by bench/families.py with random weights) and reports each policy's skipped steps and PSNR to the
uncached output; their speed on the CPU says nothing of a GPU's, so it is not reported.
"""

import argparse
import json
import statistics
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

from bench.families import CASES, TINY_SIZES, _build
from dit_serve.caching import CachePolicy
from evaluation.cache import POLICIES, psnr
from models.bundled import IMAGE_MODEL_DIR, VIDEO_MODEL_DIR
from models.loading import LoadedModel, RowCondition, load_model
from worker.sampling import generate
from worker.step_cache import RowCaches

CPU = torch.device("cpu")
GUIDANCE = 4.0


@dataclass
class SpeedRow:
    model: str
    policy: str
    auto: bool
    batch: int
    steps: int
    skipped: float
    seconds: list[float]  # each round's batch time
    outputs_per_second: float
    speedup: float  # over cache none, medians of the same run


@dataclass
class FamilyRow:
    model: str
    policy: str
    skipped: float
    psnr_mean_db: float | None
    psnr_min_db: float | None


def _run(
    model: LoadedModel,
    rows: list[RowCondition],
    policy: CachePolicy | None,
    steps: int,
    size: tuple[int, int, int],
) -> tuple[np.ndarray, float, float]:
    """One batch: pixels, skipped fraction, seconds."""
    caches = RowCaches.of([policy] * len(rows))
    start = time.perf_counter()
    pixels, _ = generate(
        model, rows, list(range(len(rows))), [GUIDANCE] * len(rows), steps, *size, caches=caches
    )
    return pixels.numpy(), caches.skipped_fraction(), time.perf_counter() - start


def speed(
    model: LoadedModel, batch: int, steps: int, rounds: int, policies: list[CachePolicy]
) -> list[SpeedRow]:
    spec = model.spec()
    width, height = (int(side) for side in spec.default_size.split("x"))
    size = (width, height, spec.defaults.num_frames or 1)
    labels = model.labels or []
    rows = [RowCondition(class_label=k % len(labels)) for k in range(batch)]
    settings: list[CachePolicy | None] = [None, *policies]
    _run(model, rows[:2], None, 2, size)  # warm-up
    times: dict[int, list[float]] = {k: [] for k in range(len(settings))}
    skipped: dict[int, float] = {}
    for _ in range(rounds):
        for k, policy in enumerate(settings):
            _, skipped[k], seconds = _run(model, rows, policy, steps, size)
            times[k].append(round(seconds, 3))
    auto = spec.cache_auto
    base = statistics.median(times[0])
    return [
        SpeedRow(
            model=spec.name,
            policy=policy.label() if policy else "none",
            auto=policy is not None and policy == auto,
            batch=batch,
            steps=steps,
            skipped=round(skipped[k], 3),
            seconds=times[k],
            outputs_per_second=round(batch / statistics.median(times[k]), 3),
            speedup=round(base / statistics.median(times[k]), 3),
        )
        for k, policy in enumerate(settings)
    ]


def families(policies: list[CachePolicy], batch: int = 2) -> list[FamilyRow]:
    """Each real family's architecture (small config, random weights): skipped steps and PSNR."""
    results = []
    for case in CASES.values():
        model = _build(case, CPU, torch.float32, tiny=True)
        rows = [RowCondition(class_label=7)] * batch
        if model.conditioning == "text":
            rows = [RowCondition(prompt=f"a red fox {k}") for k in range(batch)]
        size = TINY_SIZES[case.name]
        base, _, _ = _run(model, rows, None, case.steps, size)
        for policy in policies:
            pixels, skipped, _ = _run(model, rows, policy, case.steps, size)
            close = psnr(pixels, base)
            results.append(
                FamilyRow(
                    case.name,
                    policy.label(),
                    round(skipped, 3),
                    round(float(close.mean()), 2),
                    round(float(close.min()), 2),
                )
            )
    return results


def format_tables(speeds: list[SpeedRow], family_rows: list[FamilyRow]) -> str:
    lines = [
        "| model | policy | batch | steps | skipped steps | outputs/s | speed-up over none |",
        "|---|---|---|---|---|---|---|",
    ]
    for row in speeds:
        marker = " (auto)" if row.auto else ""
        lines.append(
            f"| {row.model} | `{row.policy}`{marker} | {row.batch} | {row.steps} | {row.skipped:.0%} | "
            f"{row.outputs_per_second:.3f} | {row.speedup:.2f}× |"
        )
    if family_rows:
        lines += ["", "| architecture (small config) | policy | skipped steps | PSNR to none (mean / min) |"]
        lines.append("|---|---|---|---|")
        for family in family_rows:
            lines.append(
                f"| {family.model} | `{family.policy}` | {family.skipped:.0%} | "
                f"{family.psnr_mean_db:.1f} / {family.psnr_min_db:.1f} dB |"
            )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="dit-serve bench cache", description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds per setting")
    parser.add_argument("--steps", type=int, default=25)
    parser.add_argument("--image-batch", type=int, default=16)
    parser.add_argument("--video-batch", type=int, default=4)
    parser.add_argument("--no-video", action="store_true", help="the image model only")
    parser.add_argument("--families", action="store_true", help="also the real families' small configs")
    parser.add_argument("--json", type=Path, default=Path("bench/results/cache.json"))
    args = parser.parse_args(argv)
    torch.set_grad_enabled(False)
    policies = POLICIES
    speeds = speed(
        load_model("dit-shapes-image", IMAGE_MODEL_DIR, CPU),
        args.image_batch,
        args.steps,
        args.rounds,
        policies,
    )
    if not args.no_video:
        video = load_model("dit-shapes-video", VIDEO_MODEL_DIR, CPU)
        auto = video.spec().cache_auto
        chosen = [policy for policy in policies if policy == auto] or policies[-1:]
        speeds += speed(video, args.video_batch, args.steps, args.rounds, chosen)
    family_rows = families(policies) if args.families else []
    print(format_tables(speeds, family_rows))
    args.json.parent.mkdir(parents=True, exist_ok=True)
    record = {"speed": [asdict(row) for row in speeds], "families": [asdict(row) for row in family_rows]}
    args.json.write_text(json.dumps(record, indent=2) + "\n")


if __name__ == "__main__":
    main()
