"""`dit-serve eval --lora DIR`: what a style adapter does to the bundled image model's samples.

Every label `per_label` times, with the same seeds, through the service's sampler (the worker's
AdapterBank, the adapter registered into a temporary storage as `--lora` would): without the adapter,
with it at scale 1, and with it at `half` scale. For each: the style measure (hollowness, 0 for filled
shapes: evaluation/style.py) and label accuracy, raw and on the filled-in silhouette (the judge was
trained on filled shapes, so an outline is judged by what it encloses).

Beside them, what the model's VAE keeps of the style: the outline renders the adapter was trained on,
encoded and decoded, measured the same way (`vae_round_trip`). An adapter changes only the transformer,
so a style the VAE cannot carry is one no adapter draws cleanly; `--outline-widths` compares widths.
"""

import json
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

from dit_serve.lora_registry import store_adapter
from dit_serve.loras import AppliedLora, read_adapter
from dit_serve.storage import LocalStorage
from evaluation.classifier import classify, load_classifier
from evaluation.style import HOLLOW, as_judged, hollowness
from models.families.class_dit import ClassConditionalDiT
from models.loading import RowCondition
from models.training import shapes
from worker.lora import AdapterBank, row_adapters
from worker.sampling import generate

STEPS, GUIDANCE, BATCH = 25, 4.0, 48
SCALES = (0.0, 0.5, 1.0)  # 0: the base model
ROUND_TRIP_SEED = 0


@dataclass
class LoraRow:
    scale: float
    samples: int
    hollowness: float  # mean share of a shape's silhouette left empty
    outlined: float  # share of samples with hollowness >= HOLLOW
    label_accuracy: float  # the judge on the samples, hollow ones filled in (evaluation/style.py)
    raw_label_accuracy: float  # the judge on the samples as they are
    seconds: float


def evaluate_lora(model: ClassConditionalDiT, adapter_dir: Path, per_label: int) -> list[LoraRow]:
    classifier = load_classifier()
    names = model.labels or []
    labels = [label for label in range(len(names)) for _ in range(per_label)]
    expected = np.array([shapes.image_labels().index(names[label]) for label in labels])
    rows = []
    with tempfile.TemporaryDirectory(prefix="dit-eval-lora-") as tmp:
        storage = LocalStorage(Path(tmp))
        info = store_adapter(
            storage, model.name, adapter_dir.name, read_adapter(adapter_dir), str(adapter_dir)
        )
        bank = AdapterBank(model.transformer, storage)
        for scale in SCALES:
            start, outputs = time.perf_counter(), []
            for first in range(0, len(labels), BATCH):
                chunk = labels[first : first + BATCH]
                loras = [(AppliedLora.of(info, scale),) if scale else ()] * len(chunk)
                pixels, _ = generate(
                    model,
                    [RowCondition(class_label=label) for label in chunk],
                    list(range(first, first + len(chunk))),
                    [GUIDANCE] * len(chunk),
                    STEPS,
                    model.native_size,
                    model.native_size,
                    adapters=row_adapters(bank, loras),
                )
                outputs.append(pixels.numpy())
            images = np.concatenate(outputs)
            hollow = hollowness(images)
            judged = classify(as_judged(images), classifier) == expected
            drawn = classify(images, classifier) == expected
            rows.append(
                LoraRow(
                    scale=scale,
                    samples=len(images),
                    hollowness=round(float(hollow.mean()), 3),
                    outlined=round(float((hollow >= HOLLOW).mean()), 3),
                    label_accuracy=round(float(judged.mean()), 4),
                    raw_label_accuracy=round(float(drawn.mean()), 4),
                    seconds=round(time.perf_counter() - start, 1),
                )
            )
    return rows


@dataclass
class RoundTrip:
    outline_width: float
    samples: int
    hollowness: float
    outlined: float
    label_accuracy: float  # as LoraRow's: hollow shapes filled in


def vae_round_trip(model: ClassConditionalDiT, outline_width: float, samples: int) -> RoundTrip:
    """The outline renders (outline_width thick) through the model's VAE and back, measured as samples are."""
    classifier = load_classifier()
    pixels, labels = shapes.image_batch(
        np.random.default_rng(ROUND_TRIP_SEED), samples, style=shapes.OUTLINE, outline_width=outline_width
    )
    x = torch.from_numpy(pixels).to(model.device).float().permute(0, 3, 1, 2) / 127.5 - 1
    decoded = model.vae.decode(model.vae.encode(x).latent_dist.mode()).sample
    images = ((decoded.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()
    hollow = hollowness(images)
    return RoundTrip(
        outline_width=outline_width,
        samples=samples,
        hollowness=round(float(hollow.mean()), 3),
        outlined=round(float((hollow >= HOLLOW).mean()), 3),
        label_accuracy=round(float((classify(as_judged(images), classifier) == labels).mean()), 4),
    )


def trained_width(adapter_dir: Path) -> float:
    """The outline width the adapter was trained on (its training.json), else today's default."""
    record = adapter_dir / "training.json"
    if record.is_file():
        return float(json.loads(record.read_text()).get("outline_width", shapes.OUTLINE_WIDTH))
    return shapes.OUTLINE_WIDTH


def format_round_trips(trips: list[RoundTrip]) -> str:
    lines = [
        "| outline renders through the VAE, width | samples | hollowness | outlined | label accuracy |",
        "|---|---|---|---|---|",
    ]
    for trip in trips:
        cells = [f"{trip.outline_width:g} px", str(trip.samples), f"{trip.hollowness:.3f}"]
        cells += [f"{trip.outlined:.1%}", f"{trip.label_accuracy:.1%}"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def format_table(rows: list[LoraRow]) -> str:
    lines = [
        "| adapter scale | samples | hollowness | outlined (hollowness ≥ 0.1) | label accuracy (outlines "
        "filled in) | label accuracy, as drawn | sampling s |",
        "|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        name = "0 (base model)" if row.scale == 0 else f"{row.scale:g}"
        cells = [name, str(row.samples), f"{row.hollowness:.3f}", f"{row.outlined:.1%}"]
        cells += [f"{row.label_accuracy:.1%}", f"{row.raw_label_accuracy:.1%}", f"{row.seconds:g}"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def run_lora_eval(
    model: ClassConditionalDiT,
    adapter_dir: Path,
    per_label: int,
    json_out: Path | None,
    outline_widths: list[float] | None = None,
) -> list[LoraRow]:
    samples = per_label * len(model.labels or [])
    with torch.inference_mode():
        rows = evaluate_lora(model, adapter_dir, per_label)
        trips = [vae_round_trip(model, w, samples) for w in outline_widths or [trained_width(adapter_dir)]]
    print(format_table(rows))
    print()
    print(format_round_trips(trips))
    if json_out:
        report = {"adapter": [asdict(row) for row in rows], "vae_round_trip": [asdict(t) for t in trips]}
        json_out.write_text(json.dumps(report, indent=2) + "\n")
    return rows
