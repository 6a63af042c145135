"""Sample every label through the service's own sampler and score the results: `dit-serve eval`."""

import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from diffusers import DDIMScheduler, DPMSolverMultistepScheduler

from evaluation.judge import frechet_distance, judge_image, judge_video, pooled_features
from models.loading import LoadedModel, load_model
from models.training import shapes
from worker.sampling import decode_latents, initial_noise, sample

CPU = torch.device("cpu")
SETTINGS = [  # (guidance scale, steps, solver): the seed document's FID/steps table in miniature
    (1.0, 25, "ddim"),
    (4.0, 25, "ddim"),
    (1.0, 10, "dpm-solver++"),
    (4.0, 10, "dpm-solver++"),
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
    if solver == "ddim":
        return DDIMScheduler.from_config(model.scheduler.config)
    return DPMSolverMultistepScheduler.from_config(model.scheduler.config, algorithm_type="dpmsolver++")


def generate(
    model: LoadedModel, labels: list[int], seeds: list[int], guidance: float, steps: int, solver: str
) -> np.ndarray:
    """Pixels for each (label, seed), through worker.sampling: (N, H, W, 3) or (N, F, H, W, 3) uint8."""
    size = model.latent_size
    shape: tuple[int, ...] = (model.latent_channels, size, size)
    if model.kind == "video":
        shape = (model.latent_channels, model.max_frames or 1, size, size)
    outputs = []
    for start in range(0, len(labels), BATCH):
        chunk_labels, chunk_seeds = labels[start : start + BATCH], seeds[start : start + BATCH]
        generators = [torch.Generator().manual_seed(seed) for seed in chunk_seeds]
        latents = initial_noise(generators, shape, CPU, torch.float32)
        with torch.inference_mode():
            latents, _ = sample(
                lambda x, t, y: model.transformer(x, timestep=t, class_labels=y).sample,
                _scheduler(model, solver),
                latents,
                torch.tensor(chunk_labels),
                torch.full((len(chunk_labels),), guidance),
                steps,
                model.null_class_id,
            )
            outputs.append(decode_latents(model.vae, latents).numpy())
    return np.concatenate(outputs)


def evaluate_images(
    model: LoadedModel, per_label: int, settings: list[tuple[float, int, str]] = SETTINGS
) -> list[Row]:
    names = model.labels
    labels = [label for label in range(len(names)) for _ in range(per_label)]
    seeds = list(range(len(labels)))
    real = shapes.image_batch(np.random.default_rng(REAL_SEED), len(labels))[0]
    rows = []
    for guidance, steps, solver in settings:
        start = time.monotonic()
        images = generate(model, labels, seeds, guidance, steps, solver)
        correct = [
            judge_image(image).label == names[label] for image, label in zip(images, labels, strict=True)
        ]
        rows.append(
            Row("image", guidance, steps, solver, len(labels), float(np.mean(correct)),
                frechet_distance=frechet_distance(pooled_features(images), pooled_features(real)),
                seconds=round(time.monotonic() - start, 1))
        )  # fmt: skip
    return rows


def evaluate_videos(
    model: LoadedModel, per_label: int, settings: list[tuple[float, int, str]] = SETTINGS
) -> list[Row]:
    names = model.labels
    labels = [label for label in range(len(names)) for _ in range(per_label)]
    seeds = list(range(len(labels)))
    rows = []
    for guidance, steps, solver in settings:
        start = time.monotonic()
        videos = generate(model, labels, seeds, guidance, steps, solver)
        verdicts = [judge_video(frames) for frames in videos]
        still = [
            verdict.label == " ".join(names[label].split()[:2])
            for (verdict, _, _), label in zip(verdicts, labels, strict=True)
        ]
        moving = [
            direction == names[label].split()[-1]
            for (_, direction, _), label in zip(verdicts, labels, strict=True)
        ]
        rows.append(
            Row("video", guidance, steps, solver, len(labels), float(np.mean(still)),
                direction_accuracy=float(np.mean(moving)),
                frame_consistency=float(np.mean([consistency for _, _, consistency in verdicts])),
                seconds=round(time.monotonic() - start, 1))
        )  # fmt: skip
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
    image_dir: Path | None, video_dir: Path | None, per_label: int, json_out: Path | None
) -> list[Row]:
    """Evaluate the given model directories and print the table."""
    rows: list[Row] = []
    if image_dir:
        rows += evaluate_images(load_model("image", image_dir, CPU), per_label)
    if video_dir:
        rows += evaluate_videos(load_model("video", video_dir, CPU), max(1, per_label // 4))
    print(format_table(rows))
    if json_out:
        json_out.write_text(json.dumps([asdict(row) for row in rows], indent=2) + "\n")
    return rows
