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

from dit_serve.caching import CachePolicy, CachePolicyName
from dit_serve.contract import ConditioningKind, JobKind, ModelDefaults, ModelSpec

# A model directory's measured step-caching default (what a request's cache: "auto" runs), written by
# `dit-serve eval --cache --write-auto` when a policy passes the quality guardrail (docs/models.md).
CACHE_AUTO_FILE = "cache_policy.json"

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
            cache_policies=self.cache_policies(),
            cache_auto=self.cache_auto(),
            **more,
        )

    def cache_policies(self) -> list[str]:
        """The step-caching policies this model can run: all of them when it has a block stack."""
        if self.cache_blocks() is None:
            return []
        return [name.value for name in CachePolicyName if name is not CachePolicyName.NONE]

    def cache_auto(self) -> CachePolicy | None:
        """The policy measured for this model (its directory's cache_policy.json), if any."""
        path = self.path / CACHE_AUTO_FILE
        if not path.is_file() or not self.cache_policies():
            return None
        return CachePolicy.model_validate_json(path.read_text())

    @abstractmethod
    def latent_shape(self, width: int, height: int, frames: int) -> tuple[int, ...]:
        """One row's latent shape: (C, h, w) for images, (C, f, h, w) for videos."""

    @abstractmethod
    def conditions(self, rows: list[RowCondition]) -> tuple[Conditioning, Conditioning]:
        """The conditional and unconditional model inputs of every row (same keys, same shapes)."""

    @abstractmethod
    def predict(self, x: torch.Tensor, t: torch.Tensor, cond: Conditioning) -> torch.Tensor:
        """The transformer's prediction on the latent channels: x (B, C, *S), t (B,) -> (B, C, *S) fp32."""

    def cache_blocks(self) -> tuple[list[torch.nn.Module], torch.nn.Module] | None:
        """For step caching: the transformer's blocks in call order, and the module whose output is the
        block stack's result (the last block, or a marker after it); None when it has no such stack.

        A transformer with a `block_stack()` method names them itself (models/space_time_dit.py); diffusers'
        DiT, PixArt and Wan run `transformer_blocks` or `blocks` in order, the last one's output the result.
        """
        transformer = getattr(self.transformer, "_orig_mod", self.transformer)  # under torch.compile
        if hasattr(transformer, "block_stack"):
            blocks, exit = transformer.block_stack()
            return list(blocks), exit
        stack = getattr(transformer, "transformer_blocks", None) or getattr(transformer, "blocks", None)
        if stack is None or len(stack) < 2:
            return None
        return list(stack), stack[-1]

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
