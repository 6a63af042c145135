"""The step-caching quality guardrail: `dit-serve eval --cache`.

Every policy is run on the bundled models through the service's own sampler, on the same labels and
seeds as `cache: "none"`, and scored against it: the judge's label accuracy, Fréchet distance to real
renders (images), direction accuracy (videos), and each row's PSNR to its uncached output. A policy may
be a model's `auto` only if label accuracy drops at most 1 point, the Fréchet distance rises at most 10%
(images), and direction accuracy drops at most 2 points (videos). `--write-auto` writes the passing
policy that skips the most block compute to the model's directory (models/families/base.py: CACHE_AUTO_FILE).
"""

import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

from dit_serve.caching import CachePolicy, CachePolicyName
from evaluation.classifier import ShapeClassifier, classify, embed, load_classifier
from evaluation.judge import frechet_distance, judge_clips
from evaluation.run import DDIM, REAL_SEED, generate, load_class_model
from models.families.base import CACHE_AUTO_FILE
from models.families.class_dit import ClassConditionalDiT
from models.training import shapes
from worker.step_cache import RowCaches

STEPS = 25  # the bundled models' default
GUIDANCE = 4.0
BATCH = 16
MAX_ACCURACY_DROP = 0.01  # 1 point
MAX_FRECHET_RISE = 0.10  # 10%
MAX_DIRECTION_DROP = 0.02  # 2 points
PEAK = 255.0
POLICIES = [
    CachePolicy(policy=CachePolicyName.FIRST_BLOCK, threshold=0.1),
    CachePolicy(policy=CachePolicyName.FIRST_BLOCK, threshold=0.2, max_skip=3),
    CachePolicy(policy=CachePolicyName.INTERVAL, interval=2, warmup=0.1, order=0),
    CachePolicy(policy=CachePolicyName.INTERVAL, interval=2, warmup=0.1),
    CachePolicy(policy=CachePolicyName.INTERVAL, interval=3),
    CachePolicy(policy=CachePolicyName.INTERVAL, interval=3, warmup=0.1),
    CachePolicy(policy=CachePolicyName.INTERVAL, interval=4, warmup=0.1),
]


@dataclass
class CacheRow:
    kind: str
    policy: str
    samples: int
    skipped: float  # skipped steps over all steps
    compute_skipped: float  # block compute skipped: first_block always runs its first block
    label_accuracy: float
    frechet_distance: float | None
    direction_accuracy: float | None
    psnr_mean_db: float | None  # to the uncached output of the same row (None for the uncached run)
    psnr_min_db: float | None
    seconds: float
    passes: bool | None = None  # the guardrail, against the uncached run


def _sample(
    model: ClassConditionalDiT, labels: list[int], policy: CachePolicy | None
) -> tuple[np.ndarray, float, float]:
    """Pixels of (label k, seed k) for every k, the skipped fraction, and the sampling seconds."""
    start = time.perf_counter()
    caches: list[RowCaches] = []
    seeds = list(range(len(labels)))
    pixels = generate(model, labels, seeds, GUIDANCE, STEPS, DDIM, policy, BATCH, caches)
    computed, skipped = (sum(counts) for counts in zip(*(c.step_counts() for c in caches), strict=True))
    return pixels, skipped / max(1, computed + skipped), time.perf_counter() - start


def psnr(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Per-row PSNR in dB between two uint8 batches of the same shape."""
    mse = ((a.astype(np.float64) - b.astype(np.float64)) ** 2).reshape(len(a), -1).mean(1)
    return 10 * np.log10(PEAK**2 / np.maximum(mse, 1e-12))


def compute_skipped(model: ClassConditionalDiT, policy: CachePolicy | None, skipped: float) -> float:
    """The share of block compute the skipped steps saved: first_block still runs the first block."""
    stack = model.cache_blocks()
    if policy is None or stack is None:
        return 0.0
    blocks = len(stack[0])
    return skipped * ((blocks - 1) / blocks if policy.policy is CachePolicyName.FIRST_BLOCK else 1.0)


def _row(
    kind: str,
    model: ClassConditionalDiT,
    policy: CachePolicy | None,
    pixels: np.ndarray,
    base: np.ndarray | None,
    skipped: float,
    **scores: object,
) -> CacheRow:
    close = psnr(pixels, base) if base is not None else None
    return CacheRow(
        skipped=round(skipped, 3),
        compute_skipped=round(compute_skipped(model, policy, skipped), 3),
        kind=kind,
        policy=policy.label() if policy else "none",
        samples=len(pixels),
        psnr_mean_db=None if close is None else round(float(close.mean()), 2),
        psnr_min_db=None if close is None else round(float(close.min()), 2),
        **scores,  # type: ignore[arg-type]
    )


def evaluate_images(
    model: ClassConditionalDiT, classifier: ShapeClassifier, per_label: int, policies: list[CachePolicy]
) -> list[CacheRow]:
    names = model.labels
    assert names is not None
    labels = [label for label in range(len(names)) for _ in range(per_label)]
    real = embed(shapes.image_batch(np.random.default_rng(REAL_SEED), len(labels))[0], classifier)
    expected = np.array([shapes.image_labels().index(names[label]) for label in labels])
    rows, base = [], None
    for policy in [None, *policies]:
        pixels, skipped, seconds = _sample(model, labels, policy)
        rows.append(
            _row(
                "image",
                model,
                policy,
                pixels,
                base,
                skipped,
                label_accuracy=float((classify(pixels, classifier) == expected).mean()),
                frechet_distance=round(frechet_distance(embed(pixels, classifier), real), 4),
                direction_accuracy=None,
                seconds=round(seconds, 1),
            )
        )
        base = pixels if base is None else base
    return _judged(rows)


def evaluate_videos(
    model: ClassConditionalDiT, classifier: ShapeClassifier, every: int, policies: list[CachePolicy]
) -> list[CacheRow]:
    """Every `every`-th video label, one clip each: colour/shape and direction accuracy."""
    names = model.labels
    assert names is not None
    labels = list(range(0, len(names), every))
    stills = np.array([shapes.image_labels().index(" ".join(names[label].split()[:2])) for label in labels])
    directions = [names[label].split()[-1] for label in labels]
    rows, base = [], None
    for policy in [None, *policies]:
        pixels, skipped, seconds = _sample(model, labels, policy)
        verdicts = judge_clips(pixels, classifier)
        rows.append(
            _row(
                "video",
                model,
                policy,
                pixels,
                base,
                skipped,
                label_accuracy=float((np.array([verdict[0] for verdict in verdicts]) == stills).mean()),
                frechet_distance=None,
                direction_accuracy=float(
                    np.mean([v[1] == d for v, d in zip(verdicts, directions, strict=True)])
                ),
                seconds=round(seconds, 1),
            )
        )
        base = pixels if base is None else base
    return _judged(rows)


def _judged(rows: list[CacheRow]) -> list[CacheRow]:
    """Each policy's row with the guardrail's verdict against the first (uncached) row."""
    base = rows[0]
    for row in rows[1:]:
        passes = row.label_accuracy >= base.label_accuracy - MAX_ACCURACY_DROP - 1e-9
        if base.frechet_distance is not None and row.frechet_distance is not None:
            passes &= row.frechet_distance <= base.frechet_distance * (1 + MAX_FRECHET_RISE)
        if base.direction_accuracy is not None and row.direction_accuracy is not None:
            passes &= row.direction_accuracy >= base.direction_accuracy - MAX_DIRECTION_DROP - 1e-9
        row.passes = bool(passes)
    return rows


def auto_policy(rows: list[CacheRow], policies: list[CachePolicy]) -> CachePolicy | None:
    """The passing policy that skips the most block compute; None when none passes."""
    by_label = {policy.label(): policy for policy in policies}
    passing = [row for row in rows if row.passes]
    return by_label[max(passing, key=lambda row: row.compute_skipped).policy] if passing else None


def format_table(rows: list[CacheRow]) -> str:
    header = ["kind", "policy", "samples", "skipped steps", "block compute skipped", "label accuracy"]
    header += ["Fréchet distance"]
    header += ["direction accuracy", "PSNR to none (mean / min)", "sampling s", "guardrail"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for row in rows:
        cells = [
            row.kind, f"`{row.policy}`", str(row.samples), f"{row.skipped:.0%}", f"{row.compute_skipped:.0%}",
            f"{row.label_accuracy:.1%}",
            "" if row.frechet_distance is None else f"{row.frechet_distance:.3f}",
            "" if row.direction_accuracy is None else f"{row.direction_accuracy:.1%}",
            "" if row.psnr_mean_db is None else f"{row.psnr_mean_db:.1f} / {row.psnr_min_db:.1f} dB",
            f"{row.seconds:g}",
            {None: "(reference)", True: "passes", False: "fails"}[row.passes],
        ]  # fmt: skip
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def run_cache_eval(
    image_dir: Path | None,
    video_dir: Path | None,
    per_label: int,
    video_every: int,
    json_out: Path | None,
    write_auto: bool,
    device: torch.device,
) -> list[CacheRow]:
    """Score every policy on the given models, print the table, and optionally write each model's auto."""
    classifier = load_classifier()
    rows: list[CacheRow] = []
    targets = [(image_dir, "image"), (video_dir, "video")]
    for path, kind in targets:
        if path is None:
            continue
        model = load_class_model(kind, path, device)
        with torch.inference_mode():
            found = (
                evaluate_images(model, classifier, per_label, POLICIES)
                if kind == "image"
                else evaluate_videos(model, classifier, video_every, POLICIES)
            )
        rows += found
        auto = auto_policy(found, POLICIES)
        print(f"{kind} model {path}: auto = {auto.label() if auto else 'none (no policy passes)'}")
        if write_auto:
            target = path / CACHE_AUTO_FILE
            if auto is None:
                target.unlink(missing_ok=True)
            else:
                target.write_text(auto.model_dump_json(indent=2, exclude_none=True) + "\n")
    print(format_table(rows))
    if json_out:
        json_out.write_text(json.dumps([asdict(row) for row in rows], indent=2) + "\n")
    return rows
