"""The outline style, measured: how hollow generated shapes are, and what they show once filled in.

A shape's pixels are those far from the light background. Its silhouette is those pixels plus the holes
they enclose (background pixels that cannot be reached from the image border without crossing the
shape). Hollowness is the share of the silhouette that is hole: about 0 for a filled shape, 0.2-0.6
for an outline of the demo adapter's width. The judge classifier (evaluation/classifier.py) was trained
on filled shapes, so a hollow shape is judged by its filled-in silhouette (the silhouette painted in
the shape's median colour on the background), any other as drawn.
"""

import numpy as np

from models.training.shapes import BACKGROUND

SHAPE_DISTANCE = 90  # L1 distance (0-765) from the background colour past which a pixel is the shape's
HOLLOW = 0.1  # a shape this hollow or more is an outline (filled renders measure 0.0)


def shape_mask(pixels: np.ndarray) -> np.ndarray:
    """(N, H, W) bool: the pixels of each (N, H, W, 3) uint8 image that are not background."""
    distance = np.abs(pixels.astype(np.int32) - np.array(BACKGROUND, dtype=np.int32)).sum(-1)
    return distance > SHAPE_DISTANCE


def holes(mask: np.ndarray) -> np.ndarray:
    """(N, H, W) bool: background pixels enclosed by the shape (unreachable from the border)."""
    free = ~mask
    reach = np.zeros_like(mask)
    reach[:, 0, :], reach[:, -1, :], reach[:, :, 0], reach[:, :, -1] = (
        free[:, 0, :],
        free[:, -1, :],
        free[:, :, 0],
        free[:, :, -1],
    )
    while True:  # grow the border's reach through background pixels, 4-connected
        grown = reach.copy()
        grown[:, 1:, :] |= reach[:, :-1, :]
        grown[:, :-1, :] |= reach[:, 1:, :]
        grown[:, :, 1:] |= reach[:, :, :-1]
        grown[:, :, :-1] |= reach[:, :, 1:]
        grown &= free
        if (grown == reach).all():
            return free & ~reach
        reach = grown


def hollowness(pixels: np.ndarray) -> np.ndarray:
    """(N,) the share of each shape's silhouette that is enclosed background (0 when nothing is drawn)."""
    mask = shape_mask(pixels)
    enclosed = holes(mask)
    silhouette = (mask | enclosed).reshape(len(pixels), -1).sum(1)
    return np.where(silhouette > 0, enclosed.reshape(len(pixels), -1).sum(1) / np.maximum(silhouette, 1), 0.0)


def as_judged(pixels: np.ndarray) -> np.ndarray:
    """What the judge reads: a hollow shape (hollowness >= HOLLOW) filled in, any other as drawn."""
    hollow = hollowness(pixels) >= HOLLOW
    return np.where(hollow[:, None, None, None], filled_in(pixels), pixels)


def filled_in(pixels: np.ndarray) -> np.ndarray:
    """Each image's silhouette painted in its stroke's colour on the background. The colour is the
    median of the shape pixels farthest from the background (the stronger half): a thin stroke's edge
    pixels are blends with the background, which would pull a median toward it (blue toward cyan)."""
    mask = shape_mask(pixels)
    silhouette = mask | holes(mask)
    distance = np.abs(pixels.astype(np.int32) - np.array(BACKGROUND, dtype=np.int32)).sum(-1)
    out = np.broadcast_to(np.array(BACKGROUND, dtype=np.uint8), pixels.shape).copy()
    for k in range(len(pixels)):
        if mask[k].any():
            strong = mask[k] & (distance[k] >= np.median(distance[k][mask[k]]))
            out[k][silhouette[k]] = np.median(pixels[k][strong], axis=0).astype(np.uint8)
    return out
