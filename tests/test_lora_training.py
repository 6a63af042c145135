"""The demo adapter's pieces: the outline style and its measure (evaluation/style.py), `dit-serve train
lora` on a tiny base writing an adapter the server reads, and `dit-serve eval --lora` scoring it."""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from dit_serve.loras import check_fits, read_adapter
from evaluation.classifier import classify, load_classifier
from evaluation.lora import SCALES, evaluate_lora, vae_round_trip
from evaluation.style import HOLLOW, as_judged, hollowness
from models.bundled import IMAGE_MODEL_DIR, IMAGE_MODEL_NAME
from models.loading import load_model
from models.training import shapes
from models.training.lora import RANK
from worker.lora import adaptable_layers


def test_outlines_are_hollow_and_judged_by_what_they_enclose() -> None:
    classifier = load_classifier()
    filled, labels = shapes.image_batch(np.random.default_rng(1), 96)
    outline, outline_labels = shapes.image_batch(np.random.default_rng(1), 96, style=shapes.OUTLINE)
    assert (labels == outline_labels).all()  # the same shapes, drawn two ways
    # every outline encloses some background; the smallest, under a 4-pixel stroke, only a little
    hollow = hollowness(outline)
    assert hollowness(filled).max() == 0.0 and hollow.min() > 0 and (hollow >= HOLLOW).mean() > 0.7
    assert (as_judged(filled) == filled).all()  # a filled shape is judged as drawn
    judged = (classify(as_judged(outline), classifier) == labels).mean()
    assert judged >= 0.98
    # the judge never saw outlines: as drawn, it reads fewer of them (thinner ones, fewer still)
    assert (classify(outline, classifier) == labels).mean() < judged
    thin, _ = shapes.image_batch(np.random.default_rng(1), 96, style=shapes.OUTLINE, outline_width=2.5)
    assert (classify(thin, classifier) == labels).mean() < 0.95
    with pytest.raises(ValueError, match="unknown style"):
        shapes.render(shapes.ShapeSpec("circle", "red", 16, 16, 8), "dotted")


@pytest.mark.slow  # trains (3 steps) in a process, then samples 72 images
def test_train_lora_writes_an_adapter_the_server_reads_and_the_eval_scores(
    model_dirs: dict[str, Path], tmp_path: Path
) -> None:
    command = [sys.executable, "-m", "cli", "train", "lora", "--base", str(model_dirs["img"]), "--style"]
    command += ["outline", "--steps", "3", "--out-dir", str(tmp_path)]
    done = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    adapter_dir = tmp_path / "outline"
    assert f"--lora dit-shapes-image:outline={adapter_dir}" in done.stdout
    record = json.loads((adapter_dir / "training.json").read_text())
    assert record["steps"] == 3 and record["style"] == "outline" and record["rank"] == RANK
    assert record["outline_width"] == shapes.OUTLINE_WIDTH
    model = load_model("img", model_dirs["img"], torch.device("cpu"))
    adapter = read_adapter(adapter_dir)
    check_fits(adapter, adaptable_layers(model.transformer), "img")  # a PEFT directory of this base
    assert adapter.rank == RANK and len(adapter.weights) < 2 * 1024 * 1024
    with torch.inference_mode():
        rows = evaluate_lora(model, adapter_dir, 1)  # type: ignore[arg-type]
    assert [row.scale for row in rows] == list(SCALES) and all(row.samples == 24 for row in rows)
    assert all(0 <= row.hollowness <= 1 and 0 <= row.label_accuracy <= 1 for row in rows)


@pytest.mark.slow  # the bundled model and the judge, 192 renders
def test_the_bundled_vae_carries_thick_outlines_better_than_thin_ones() -> None:
    """Why the outline adapter's width matters: an adapter changes only the transformer, and the bundled
    VAE (trained on filled shapes) blurs thin strokes into other colours (docs/models.md)."""
    model = load_model(IMAGE_MODEL_NAME, IMAGE_MODEL_DIR, torch.device("cpu"))
    with torch.inference_mode():
        thin, thick = (vae_round_trip(model, width, 96) for width in (2.5, 4.0))  # type: ignore[arg-type]
    assert thin.label_accuracy < 0.9 < thick.label_accuracy
    assert thick.outlined > 0.4 and thick.hollowness > 0.1  # still outlines
