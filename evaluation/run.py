"""Sample every label through the service's own sampler and score the results: `dit-serve eval`."""

import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from diffusers import DDIMScheduler, DPMSolverMultistepScheduler

from dit_serve.caching import CachePolicy
from evaluation.classifier import ShapeClassifier, classify, embed, load_classifier
from evaluation.judge import frechet_distance, judge_clips
from models.families.class_dit import ClassConditionalDiT
from models.loading import LoadedModel, RowCondition, load_model
from models.training import shapes
from worker.sampling import generate as sample_rows
from worker.step_cache import RowCaches

CPU = torch.device("cpu")
DDIM, DPM_SOLVER = "ddim", "dpm-solver++"
SETTINGS = [  # (guidance scale, steps, solver): the seed document's FID/steps table in miniature
    (1.0, 25, DDIM),
    (4.0, 25, DDIM),
    (1.0, 10, DPM_SOLVER),
    (4.0, 10, DPM_SOLVER),
]
BATCH = 64  # outputs per sampling call
REAL_SEED = 10_000


@dataclass
class Row:
    kind: str
    guidance: float
    steps: int
    solver: str
    samples: int
    label_accuracy: float
    frechet_distance: float | None = None
    direction_accuracy: float | None = None
    frame_consistency: float | None = None
    seconds: float = 0.0


def _scheduler(model: LoadedModel, solver: str) -> DDIMScheduler | DPMSolverMultistepScheduler:
    if solver == DDIM:
        return DDIMScheduler.from_config(model.scheduler.config)
    return DPMSolverMultistepScheduler.from_config(model.scheduler.config, algorithm_type="dpmsolver++")


def generate(
    model: ClassConditionalDiT,
    labels: list[int],
    seeds: list[int],
    guidance: float,
    steps: int,
    solver: str,
    policy: CachePolicy | None = None,
    batch: int = BATCH,
    caches: list[RowCaches] | None = None,
) -> np.ndarray:
    """Pixels for each (label, seed), through worker.sampling: (N, H, W, 3) or (N, F, H, W, 3) uint8.

    `policy`: every row's step caching; each chunk's RowCaches (what it skipped) is appended to `caches`.
    """
    size, frames = model.native_size, model.max_frames or 1
    outputs = []
    for start in range(0, len(labels), batch):
        chunk_labels, chunk_seeds = labels[start : start + batch], seeds[start : start + batch]
        chunk_caches = RowCaches.of([policy] * len(chunk_labels))
        pixels, _ = sample_rows(
            model,
            [RowCondition(class_label=label) for label in chunk_labels],
            chunk_seeds,
            [guidance] * len(chunk_labels),
            steps,
            size,
            size,
            frames,
            scheduler=_scheduler(model, solver),
            caches=chunk_caches,
        )
        outputs.append(pixels.numpy())
        if caches is not None:
            caches.append(chunk_caches)
    return np.concatenate(outputs)


def load_class_model(name: str, path: Path, device: torch.device) -> ClassConditionalDiT:
    model = load_model(name, path, device)
    if not isinstance(model, ClassConditionalDiT):
        raise SystemExit(
            f"{path} holds a {model.family} model; the evaluator scores the bundled shapes models"
        )
    return model


def evaluate_images(model: ClassConditionalDiT, classifier: ShapeClassifier, per_label: int) -> list[Row]:
    """Label accuracy and Fréchet distance (classifier features) for every setting."""
    names = model.labels
    labels = [label for label in range(len(names)) for _ in range(per_label)]
    seeds = list(range(len(labels)))
    real = embed(shapes.image_batch(np.random.default_rng(REAL_SEED), len(labels))[0], classifier)
    expected = np.array([shapes.image_labels().index(names[label]) for label in labels])
    rows = []
    for guidance, steps, solver in SETTINGS:
        start = time.monotonic()
        images = generate(model, labels, seeds, guidance, steps, solver)
        accuracy = float((classify(images, classifier) == expected).mean())
        distance = frechet_distance(embed(images, classifier), real)
        seconds = round(time.monotonic() - start, 1)
        rows.append(Row("image", guidance, steps, solver, len(labels), accuracy, distance, seconds=seconds))
    return rows


def evaluate_videos(model: ClassConditionalDiT, classifier: ShapeClassifier, per_label: int) -> list[Row]:
    """Colour/shape accuracy, direction accuracy and frame consistency for every setting."""
    names = model.labels
    labels = [label for label in range(len(names)) for _ in range(per_label)]
    seeds = list(range(len(labels)))
    stills = np.array([shapes.image_labels().index(" ".join(names[label].split()[:2])) for label in labels])
    directions = [names[label].split()[-1] for label in labels]
    rows = []
    for guidance, steps, solver in SETTINGS:
        start = time.monotonic()
        verdicts = judge_clips(generate(model, labels, seeds, guidance, steps, solver), classifier)
        still_accuracy = float((np.array([verdict[0] for verdict in verdicts]) == stills).mean())
        direction_accuracy = float(np.mean([v[1] == d for v, d in zip(verdicts, directions, strict=True)]))
        consistency = float(np.mean([verdict[2] for verdict in verdicts]))
        seconds = round(time.monotonic() - start, 1)
        rows.append(
            Row(
                "video",
                guidance,
                steps,
                solver,
                len(labels),
                still_accuracy,
                None,
                direction_accuracy,
                consistency,
                seconds,
            )
        )
    return rows


def format_table(rows: list[Row]) -> str:
    header = ["kind", "guidance", "steps", "solver", "samples", "label accuracy", "Fréchet distance"]
    header += ["direction accuracy", "frame consistency", "seconds"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for row in rows:
        cells = [
            row.kind, f"{row.guidance:g}", str(row.steps), row.solver, str(row.samples),
            f"{row.label_accuracy:.1%}",
            "" if row.frechet_distance is None else f"{row.frechet_distance:.3f}",
            "" if row.direction_accuracy is None else f"{row.direction_accuracy:.1%}",
            "" if row.frame_consistency is None else f"{row.frame_consistency:.1%}",
            f"{row.seconds:g}",
        ]  # fmt: skip
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def run_eval(
    image_dir: Path | None,
    video_dir: Path | None,
    per_label: int,
    json_out: Path | None,
    device: torch.device = CPU,
) -> list[Row]:
    """Evaluate the given model directories (sampled on device; judged on the CPU) and print the table."""
    classifier = load_classifier()
    rows: list[Row] = []
    if image_dir:
        rows += evaluate_images(load_class_model("image", image_dir, device), classifier, per_label)
    if video_dir:
        rows += evaluate_videos(
            load_class_model("video", video_dir, device), classifier, max(1, per_label // 4)
        )
    print(format_table(rows))
    if json_out:
        json_out.write_text(json.dumps([asdict(row) for row in rows], indent=2) + "\n")
    return rows
