"""What every served DiT family provides to the one batched CFG sampler (worker/sampling.py).

A family adapter owns the parts in which DiT families differ: how a row's condition (a class id, or a
prompt and negative prompt) becomes transformer inputs, how the transformer is called and its output
trimmed (learned sigma), the latent shape of a size, and how latents become pixels. The denoising loop,
CFG mixing, batching, progress and cancel are the sampler's and the same for all.
"""

from abc import ABC, abstractmethod
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from diffusers.schedulers.scheduling_utils import SchedulerMixin

from dit_serve.contract import ConditioningKind, JobKind, ModelDefaults, ModelSpec

# Model inputs besides the latents and timesteps, one row per output: every value is (N, ...).
Conditioning = dict[str, torch.Tensor]


@dataclass(frozen=True)
class RowCondition:
    """What one output row is conditioned on."""

    class_label: int | None = None
    prompt: str | None = None
    negative_prompt: str = ""


class LoadedModel(ABC):
    """A model's components on their device, and its family's way of driving them."""

    family: str
    kind: JobKind
    conditioning: ConditioningKind

    def __init__(self, name: str, path: Path, components: dict[str, Any], index: dict[str, Any]):
        self.name = name
        self.path = path
        # diffusers modules, typed Any: their `config` attributes are dynamic.
        self.transformer: Any = components["transformer"]
        self.vae: Any = components["vae"]
        self.scheduler: SchedulerMixin = components["scheduler"]
        self.index = index

    @property
    def device(self) -> torch.device:
        return next(self.transformer.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.transformer.parameters()).dtype

    @property
    def labels(self) -> list[str] | None:
        """Class names by id, for class-conditional models."""
        return None

    @property
    def latent_channels(self) -> int:
        return int(self.transformer.config.in_channels)

    def new_scheduler(self) -> SchedulerMixin:
        """A fresh scheduler per batch: schedulers keep per-run state (timesteps, multistep history)."""
        return type(self.scheduler).from_config(self.scheduler.config)

    @abstractmethod
    def spec(self) -> ModelSpec:
        """What clients may ask of this model: its one description (served by GET /v1/models)."""

    def _spec(self, sizes: list[str], defaults: ModelDefaults, **more: Any) -> ModelSpec:
        """The spec with this model's name, kind, family and conditioning; `sizes[0]` is the default size."""
        return ModelSpec(
            name=self.name,
            kind=self.kind,
            family=self.family,
            conditioning=self.conditioning,
            sizes=sizes,
            default_size=sizes[0],
            defaults=defaults,
            **more,
        )

    @abstractmethod
    def latent_shape(self, width: int, height: int, frames: int) -> tuple[int, ...]:
        """One row's latent shape: (C, h, w) for images, (C, f, h, w) for videos."""

    @abstractmethod
    def conditions(self, rows: list[RowCondition]) -> tuple[Conditioning, Conditioning]:
        """The conditional and unconditional model inputs of every row (same keys, same shapes)."""

    @abstractmethod
    def predict(self, x: torch.Tensor, t: torch.Tensor, cond: Conditioning) -> torch.Tensor:
        """The transformer's prediction on the latent channels: x (B, C, *S), t (B,) -> (B, C, *S) fp32."""

    @abstractmethod
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Latents (N, C, *S) to 8-bit RGB on the CPU: (N, H, W, 3) or (N, F, H, W, 3)."""


def to_uint8(images: torch.Tensor) -> torch.Tensor:
    """[-1, 1] decoder output, channels second, to rounded 8-bit channels-last on the CPU.

    This is diffusers' postprocessing ((x / 2 + 0.5).clamp(0, 1), then * 255 and round in numpy_to_pil).
    """
    pixels = (images.float() / 2 + 0.5).clamp(0, 1)  # (N, 3, ...)
    # Rounded on the device and copied as bytes: a quarter of the float32 transfer.
    return (pixels * 255).round().to(torch.uint8).movedim(1, -1).cpu()  # (N, ..., 3)
