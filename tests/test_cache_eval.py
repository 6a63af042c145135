"""The step-caching guardrail (`dit-serve eval --cache`, evaluation/cache.py): its verdicts, how it picks a
model's `auto`, and a whole run on the tiny image model (random weights, the shapes' labels) that scores
each policy against the uncached run and writes the model's cache_policy.json."""

import json
import shutil
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch

from dit_serve.caching import CachePolicy, CachePolicyName
from evaluation.cache import (
    POLICIES,
    CacheRow,
    _judged,
    auto_policy,
    compute_skipped,
    evaluate_images,
    format_table,
    psnr,
    run_cache_eval,
)
from evaluation.classifier import load_classifier
from evaluation.run import load_class_model
from models.families.base import CACHE_AUTO_FILE
from models.loading import RowCondition
from worker.sampling import generate
from worker.step_cache import RowCaches

CPU = torch.device("cpu")
INTERVAL_2 = CachePolicy(policy=CachePolicyName.INTERVAL, interval=2, warmup=0.1)


def _row(
    policy: str, accuracy: float, frechet: float | None, direction: float | None, skip: float
) -> CacheRow:
    return CacheRow(
        kind="image",
        policy=policy,
        samples=24,
        skipped=skip,
        compute_skipped=skip,
        label_accuracy=accuracy,
        frechet_distance=frechet,
        direction_accuracy=direction,
        psnr_mean_db=None,
        psnr_min_db=None,
        seconds=1.0,
    )


def test_the_guardrail_passes_only_policies_within_every_bound() -> None:
    base = _row("none", 0.95, 10.0, 0.90, 0.0)
    rows = _judged(
        [
            base,
            _row("within", 0.94, 10.99, 0.885, 0.5),  # -1 point, +9.9%, -1.5 points: passes
            _row("accuracy", 0.935, 10.0, 0.90, 0.5),  # -1.5 points
            _row("frechet", 0.95, 11.01, 0.90, 0.5),  # +10.1%
            _row("direction", 0.95, 10.0, 0.875, 0.5),  # -2.5 points
            _row("better", 1.0, 5.0, 1.0, 0.5),
        ]
    )
    assert [row.passes for row in rows] == [None, True, False, False, False, True]


def test_auto_is_the_passing_policy_that_skips_the_most_block_compute() -> None:
    a, b, c = POLICIES[2], POLICIES[4], POLICIES[6]
    rows = _judged(
        [
            _row("none", 1.0, 10.0, None, 0.0),
            _row(a.label(), 1.0, 10.0, None, 0.4),
            _row(b.label(), 1.0, 10.5, None, 0.6),
            _row(c.label(), 0.9, 10.0, None, 0.7),  # skips most but fails
        ]
    )
    assert auto_policy(rows, POLICIES) == b
    assert auto_policy([rows[0], replace(rows[3], passes=False)], POLICIES) is None


def test_first_block_still_runs_its_first_block_and_psnr_is_per_row(model_dirs: dict[str, Path]) -> None:
    model = load_class_model("img", model_dirs["img"], CPU)
    stack = model.cache_blocks()
    assert stack is not None
    blocks = len(stack[0])
    assert compute_skipped(model, POLICIES[0], 0.5) == pytest.approx(0.5 * (blocks - 1) / blocks)
    assert compute_skipped(model, INTERVAL_2, 0.5) == 0.5 and compute_skipped(model, None, 0.5) == 0.0
    a = np.zeros((2, 4, 4, 3), dtype=np.uint8)
    b = a.copy()
    b[1] += 1  # one row off by 1/255 everywhere: 20 log10(255) dB
    assert psnr(a, b)[1] == pytest.approx(20 * np.log10(255.0)) and psnr(a, b)[0] > 100


def test_a_policy_is_scored_against_the_uncached_run_of_the_same_rows(model_dirs: dict[str, Path]) -> None:
    model = load_class_model("img", model_dirs["img"], CPU)
    with torch.inference_mode():
        rows = evaluate_images(model, load_classifier(), 1, [INTERVAL_2])
        labels = list(range(len(model.labels or [])))
        caches = RowCaches.of([INTERVAL_2] * len(labels))
        direct, _ = generate(
            model,
            [RowCondition(class_label=label) for label in labels],
            list(range(len(labels))),
            [4.0] * len(labels),
            25,
            32,
            32,
            caches=caches,
        )
    none, cached = rows
    assert (none.policy, none.passes, none.psnr_mean_db, none.skipped) == ("none", None, None, 0.0)
    assert cached.policy == INTERVAL_2.label() and cached.samples == len(labels) == 24
    # the eval's skipped share is the sampler's own count for the same rows
    assert cached.skipped == round(caches.skipped_fraction(), 3) > 0.3
    assert cached.psnr_min_db is not None and cached.psnr_mean_db is not None
    assert 0 < cached.psnr_min_db <= cached.psnr_mean_db < 100  # the cached rows differ, a little
    assert cached.frechet_distance is not None and cached.passes is not None
    assert direct.shape == (24, 32, 32, 3)
    assert "(reference)" in format_table(rows) and f"`{INTERVAL_2.label()}`" in format_table(rows)


@pytest.mark.slow  # every policy on the tiny model: a few seconds
def test_write_auto_writes_the_chosen_policy_beside_the_model(
    model_dirs: dict[str, Path], tmp_path: Path
) -> None:
    model_dir = tmp_path / "img"
    shutil.copytree(model_dirs["img"], model_dir)
    (model_dir / CACHE_AUTO_FILE).write_text("stale")
    out = tmp_path / "rows.json"
    rows = run_cache_eval(model_dir, None, 1, 1, out, write_auto=True, device=CPU)
    auto = auto_policy(rows, POLICIES)
    assert [row["policy"] for row in json.loads(out.read_text())] == ["none"] + [p.label() for p in POLICIES]
    written = model_dir / CACHE_AUTO_FILE
    if auto is None:
        assert not written.exists()
    else:
        assert CachePolicy.model_validate_json(written.read_text()) == auto
