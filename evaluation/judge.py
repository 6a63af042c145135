"""Analytic parts of the judge: where the shape is (its centroid track gives the motion direction) and
the Fréchet distance. What the shape is comes from the classifier (evaluation/classifier.py).
"""

import numpy as np

from evaluation.classifier import ShapeClassifier, classify
from models.training.shapes import BACKGROUND, DIRECTIONS

FOREGROUND_DISTANCE = 60.0  # RGB distance from the background that counts as shape
MIN_FOREGROUND_PIXELS = 6
MIN_TRAVEL_PX = 2.0  # less centroid travel than this over a clip is "not moving"
NO_SHAPE = "none"


def foreground(pixels: np.ndarray) -> np.ndarray:
    """(H, W) bool mask of the pixels that differ clearly from the background; pixels (H, W, 3) uint8."""
    distance = np.linalg.norm(pixels.astype(np.float64) - np.array(BACKGROUND), axis=-1)  # (H, W)
    return distance > FOREGROUND_DISTANCE


def centroid(pixels: np.ndarray) -> tuple[float, float] | None:
    mask = foreground(pixels)
    if mask.sum() < MIN_FOREGROUND_PIXELS:
        return None
    rows, cols = np.nonzero(mask)
    return float(cols.mean()), float(rows.mean())


def judge_direction(frames: np.ndarray) -> str:
    """left/right/up/down from the centroid's travel between the first and last frames; (F, H, W, 3)."""
    track = [point for point in (centroid(frame) for frame in frames) if point is not None]
    if len(track) < 2:
        return NO_SHAPE
    dx, dy = track[-1][0] - track[0][0], track[-1][1] - track[0][1]
    if max(abs(dx), abs(dy)) < MIN_TRAVEL_PX:
        return NO_SHAPE
    step = (np.sign(dx), 0.0) if abs(dx) >= abs(dy) else (0.0, np.sign(dy))
    return next(name for name, vector in DIRECTIONS.items() if vector == step)


def frechet_distance(a: np.ndarray, b: np.ndarray) -> float:
    """Fréchet distance between Gaussians fitted to two feature sets, (N, D) each (as FID computes it)."""
    mu_a, mu_b = a.mean(0), b.mean(0)
    cov_a, cov_b = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    # sqrt of cov_a @ cov_b through the symmetric form cov_a^1/2 cov_b cov_a^1/2 (real eigenvalues)
    values, vectors = np.linalg.eigh(cov_a)
    root_a = (vectors * np.sqrt(np.clip(values, 0, None))) @ vectors.T
    middle = np.linalg.eigvalsh(root_a @ cov_b @ root_a)
    trace_sqrt = np.sqrt(np.clip(middle, 0, None)).sum()
    return float(((mu_a - mu_b) ** 2).sum() + np.trace(cov_a) + np.trace(cov_b) - 2 * trace_sqrt)


def judge_clips(videos: np.ndarray, classifier: ShapeClassifier) -> list[tuple[int, str, float]]:
    """For each clip (N, F, H, W, 3): its majority class id (colour+shape), direction, and frame consistency.

    Frame consistency is the share of frames whose class is the clip's majority class.
    """
    n, f = videos.shape[:2]
    per_frame = classify(videos.reshape(n * f, *videos.shape[2:]), classifier).reshape(n, f)  # (N, F)
    verdicts = []
    for frames, classes in zip(videos, per_frame, strict=True):
        counts = np.bincount(classes)
        verdicts.append((int(counts.argmax()), judge_direction(frames), float(counts.max() / f)))
    return verdicts
