"""A small CNN that names the colour and shape in a 32x32 image: the evaluator's judge.

Trained on the generated shapes with augmentations that mimic what a generator gets wrong (blur,
noise, colour and background shifts), so it reads soft, slightly off samples the way a person would,
yet only ever saw real renders. Its penultimate features also serve the Fréchet distance, the way
FID uses Inception's. `dit-serve train judge` retrains it from a fixed seed (about a minute).
"""

from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn

from models.training import shapes

WEIGHTS = Path(__file__).resolve().parent / "judge-classifier.safetensors"
FEATURES = 128
STEPS, BATCH, LEARNING_RATE, SEED = 1200, 128, 2e-3, 0
# Sizes of both the stills and the (smaller) shapes in the videos.
HALF_SIZE = (shapes.VIDEO_HALF_SIZE[0], shapes.IMAGE_HALF_SIZE[1])
MAX_BLUR_SIGMA = 1.5  # pixels
MAX_NOISE = 0.06  # std, on the [-1, 1] scale
MAX_SHIFT = 0.12  # per-channel colour/brightness shift, on the [-1, 1] scale


class ShapeClassifier(nn.Module):
    """Three conv blocks and two linear layers: (N, 3, 32, 32) in [-1, 1] -> (N, 24) logits."""

    def __init__(self, num_classes: int = len(shapes.image_labels())):
        super().__init__()
        self.conv = nn.Sequential(
            nn.Conv2d(3, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),  # (N, 32, 16, 16)
            nn.Conv2d(32, 64, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),  # (N, 64, 8, 8)
            nn.Conv2d(64, 64, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),  # (N, 64, 4, 4)
        )  # fmt: skip
        self.features = nn.Sequential(nn.Flatten(), nn.Linear(64 * 4 * 4, FEATURES), nn.ReLU())  # (N, 128)
        self.head = nn.Linear(FEATURES, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(self.conv(x)))

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        return self.features(self.conv(x))


def to_input(pixels: np.ndarray) -> torch.Tensor:
    """(N, H, W, 3) uint8 -> (N, 3, H, W) float in [-1, 1]."""
    return torch.from_numpy(pixels).float().permute(0, 3, 1, 2) / 127.5 - 1


def _blur(x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """Per-image Gaussian blur; x (N, 3, H, W), sigma (N,)."""
    offsets = torch.arange(-3, 4, dtype=x.dtype)  # (7,)
    kernels = torch.exp(-(offsets[None] ** 2) / (2 * sigma[:, None].clamp(min=1e-3) ** 2))  # (N, 7)
    kernels = kernels / kernels.sum(1, keepdim=True)
    n, c, h, w = x.shape
    rows = kernels.repeat_interleave(c, 0)[:, None, None, :]  # (N*C, 1, 1, 7)
    y = F.conv2d(F.pad(x.reshape(1, n * c, h, w), (3, 3, 0, 0), mode="replicate"), rows, groups=n * c)
    y = F.conv2d(F.pad(y, (0, 0, 3, 3), mode="replicate"), rows.transpose(2, 3), groups=n * c)
    return y.reshape(n, c, h, w)


def augment(x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    n = x.shape[0]
    x = _blur(x, torch.rand(n, generator=generator) * MAX_BLUR_SIGMA)
    x = x + (torch.rand(n, 3, 1, 1, generator=generator) * 2 - 1) * MAX_SHIFT
    x = (
        x
        + torch.randn(x.shape, generator=generator) * torch.rand(n, 1, 1, 1, generator=generator) * MAX_NOISE
    )
    return x.clamp(-1, 1)


def train_classifier(path: Path = WEIGHTS) -> float:
    """Train from the fixed seed, save to `path`; returns accuracy on fresh clean renders."""
    torch.manual_seed(SEED)
    rng, generator = np.random.default_rng(SEED), torch.Generator().manual_seed(SEED)
    model = ShapeClassifier()
    optimiser = torch.optim.AdamW(model.parameters(), lr=LEARNING_RATE)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimiser, max_lr=LEARNING_RATE, total_steps=STEPS)
    for _ in range(STEPS):
        pixels, labels = shapes.image_batch(rng, BATCH, HALF_SIZE)
        loss = F.cross_entropy(model(augment(to_input(pixels), generator)), torch.from_numpy(labels))
        optimiser.zero_grad(set_to_none=True)
        loss.backward()
        optimiser.step()
        schedule.step()
    model.eval()
    save_file(model.state_dict(), str(path))
    pixels, labels = shapes.image_batch(np.random.default_rng(SEED + 1), 1000, HALF_SIZE)
    return float((classify(pixels, model) == labels).mean())


def load_classifier(path: Path = WEIGHTS) -> ShapeClassifier:
    if not path.is_file():
        raise SystemExit(f"{path} not found: run `dit-serve train judge`")
    model = ShapeClassifier()
    model.load_state_dict(load_file(str(path)))
    return model.eval()


@torch.no_grad()
def classify(pixels: np.ndarray, model: ShapeClassifier) -> np.ndarray:
    """(N, H, W, 3) uint8 -> (N,) class ids in shapes.image_labels()."""
    return np.concatenate(
        [
            model(to_input(chunk)).argmax(1).numpy()
            for chunk in np.array_split(pixels, max(1, len(pixels) // 256))
        ]
    )


@torch.no_grad()
def embed(pixels: np.ndarray, model: ShapeClassifier) -> np.ndarray:
    """(N, H, W, 3) uint8 -> (N, 128) features for the Fréchet distance."""
    return np.concatenate(
        [model.embed(to_input(chunk)).numpy() for chunk in np.array_split(pixels, max(1, len(pixels) // 256))]
    )
