"""An analytic judge of colour, shape and motion for the shapes data set; no learned weights.

Colour: the median colour of the foreground (pixels far from the background), nearest palette entry.
Shape: from the foreground mask. The fill of its bounding box separates squares (~1), circles (~pi/4)
and the two half-filled shapes; a triangle (apex up) has its centroid low in the box (~2/3 of the
height), a diamond in the middle. Motion: the centroid track over the frames.
"""

from dataclasses import dataclass

import numpy as np

from models.training.shapes import BACKGROUND, COLOURS, DIRECTIONS

FOREGROUND_DISTANCE = 60.0  # RGB distance from the background that counts as shape
MIN_FOREGROUND_PIXELS = 6
SQUARE_FILL = 0.88  # fill above this: square
CIRCLE_FILL = 0.66  # fill above this (and below SQUARE_FILL): circle
TRIANGLE_CENTROID = 0.56  # centroid depth in the box (0 top, 1 bottom) above this: triangle
MIN_TRAVEL_PX = 2.0  # less centroid travel than this over a clip is "not moving"
NO_SHAPE = "none"


@dataclass(frozen=True)
class Verdict:
    colour: str
    shape: str

    @property
    def label(self) -> str:
        return f"{self.colour} {self.shape}"


def foreground(pixels: np.ndarray) -> np.ndarray:
    """(H, W) bool mask of the pixels that differ clearly from the background; pixels (H, W, 3) uint8."""
    distance = np.linalg.norm(pixels.astype(np.float64) - np.array(BACKGROUND), axis=-1)  # (H, W)
    return distance > FOREGROUND_DISTANCE


def judge_image(pixels: np.ndarray) -> Verdict:
    """The colour and shape an image shows, or "none" where no shape stands out."""
    mask = foreground(pixels)
    if mask.sum() < MIN_FOREGROUND_PIXELS:
        return Verdict(NO_SHAPE, NO_SHAPE)
    median = np.median(pixels[mask].astype(np.float64), axis=0)  # (3,)
    colour = min(COLOURS, key=lambda name: float(np.linalg.norm(median - np.array(COLOURS[name]))))
    rows, cols = np.nonzero(mask)
    height, width = rows.max() - rows.min() + 1, cols.max() - cols.min() + 1
    fill = mask.sum() / (height * width)
    if fill > SQUARE_FILL:
        shape = "square"
    elif fill > CIRCLE_FILL:
        shape = "circle"
    else:
        depth = (rows.mean() - rows.min() + 0.5) / height
        shape = "triangle" if depth > TRIANGLE_CENTROID else "diamond"
    return Verdict(colour, shape)


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


def judge_video(frames: np.ndarray) -> tuple[Verdict, str, float]:
    """The clip's majority colour+shape, its direction, and the share of frames agreeing with the majority."""
    verdicts = [judge_image(frame) for frame in frames]
    labels = [verdict.label for verdict in verdicts]
    majority = max(set(labels), key=labels.count)
    consistency = labels.count(majority) / len(labels)
    return verdicts[labels.index(majority)], judge_direction(frames), consistency


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


POOL = 4  # 32x32 -> 8x8: features are 8x8x3 average-pooled pixels


def pooled_features(images: np.ndarray) -> np.ndarray:
    """(N, H, W, 3) uint8 -> (N, 192): a crude pixel-level feature (not Inception's)."""
    n, h, w, c = images.shape
    pooled = images.astype(np.float64).reshape(n, h // POOL, POOL, w // POOL, POOL, c).mean(axis=(2, 4))
    return pooled.reshape(n, -1) / 255.0
