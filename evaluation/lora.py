"""`dit-serve eval --lora DIR`: what a style adapter does to the bundled image model's samples.

Every label `per_label` times, with the same seeds, through the service's sampler (the worker's
AdapterBank, the adapter registered into a temporary storage as `--lora` would): without the adapter,
with it at scale 1, and with it at `half` scale. For each: the style measure (hollowness, 0 for filled
shapes: evaluation/style.py) and label accuracy, raw and on the filled-in silhouette (the judge was
trained on filled shapes, so an outline is judged by what it encloses).
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
    model: ClassConditionalDiT, adapter_dir: Path, per_label: int, json_out: Path | None
) -> list[LoraRow]:
    with torch.inference_mode():
        rows = evaluate_lora(model, adapter_dir, per_label)
    print(format_table(rows))
    if json_out:
        json_out.write_text(json.dumps([asdict(row) for row in rows], indent=2) + "\n")
    return rows
