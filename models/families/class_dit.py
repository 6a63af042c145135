"""Class-conditional DiTs: facebook/DiT-XL-2-256/-512 (DiTPipeline) and the bundled space-time video DiT.

CFG's unconditional row is the null class (id `num_embeds_ada_norm`, 1000 for ImageNet DiTs); with
learned sigma (out_channels = 2 * in_channels) the variance channels are dropped, as DiTPipeline does.
"""

from pathlib import Path
from typing import Any

import torch

from dit_serve.contract import ConditioningKind, JobKind, ModelDefaults, ModelSpec
from models.families.base import Conditioning, LoadedModel, RowCondition
from models.families.kl_vae import decode_kl

DEFAULT_STEPS = 25  # DiTPipeline's 250 DDPM-style steps are not needed with DDIM / DPM-Solver
DEFAULT_GUIDANCE = 4.0  # DiTPipeline's default


class ModelConfigError(ValueError):
    """A checkpoint whose config the family cannot serve."""


def read_labels(index: dict[str, Any]) -> list[str]:
    """Each class id's id2label entry (comma-separated synonyms), as DiTPipeline.get_label_ids reads it."""
    id2label = index.get("id2label") or {}
    names = [""] * (max((int(key) for key in id2label), default=-1) + 1)
    for key, value in id2label.items():
        names[int(key)] = ", ".join(part.strip() for part in str(value).split(",") if part.strip())
    return names


class ClassConditionalDiT(LoadedModel):
    family = "dit"
    conditioning = ConditioningKind.CLASS

    def __init__(self, name: str, path: Path, components: dict[str, Any], index: dict[str, Any]):
        super().__init__(name, path, components, index)
        self.kind = JobKind.VIDEO if hasattr(self.transformer.config, "num_frames") else JobKind.IMAGE
        if self.kind is JobKind.VIDEO:
            self.family = "dit-video"
        # DiTPipeline.save_pretrained writes no id2label: such a model serves class ids, not names.
        self._labels = read_labels(index) or None
        self.null_class_id = int(self.transformer.config.num_embeds_ada_norm)
        self.num_classes = len(self._labels) if self._labels else self.null_class_id
        if self._labels and len(self._labels) > self.null_class_id:
            raise ModelConfigError(
                f"{len(self._labels)} labels but only {self.null_class_id} class embeddings"
            )
        self.latent_size = int(self.transformer.config.sample_size)
        self.vae_scale_factor = 2 ** (len(self.vae.config.block_out_channels) - 1)

    @property
    def labels(self) -> list[str] | None:
        return self._labels

    @property
    def native_size(self) -> int:
        return self.latent_size * self.vae_scale_factor

    @property
    def max_frames(self) -> int | None:
        return int(self.transformer.config.num_frames) if self.kind is JobKind.VIDEO else None

    def spec(self) -> ModelSpec:
        return self._spec(
            [f"{self.native_size}x{self.native_size}"],
            ModelDefaults(
                num_inference_steps=DEFAULT_STEPS, guidance_scale=DEFAULT_GUIDANCE, num_frames=self.max_frames
            ),
            labels=self.labels,
            num_classes=self.num_classes,
            max_frames=self.max_frames,
        )

    def latent_shape(self, width: int, height: int, frames: int) -> tuple[int, ...]:
        h, w = height // self.vae_scale_factor, width // self.vae_scale_factor
        if self.kind is JobKind.VIDEO:
            return (self.latent_channels, frames, h, w)
        return (self.latent_channels, h, w)

    def class_conditions(self, class_labels: torch.Tensor) -> tuple[Conditioning, Conditioning]:
        """Cond and uncond inputs for (N,) class ids."""
        labels = class_labels.to(self.device)
        return {"class_labels": labels}, {"class_labels": torch.full_like(labels, self.null_class_id)}

    def conditions(self, rows: list[RowCondition]) -> tuple[Conditioning, Conditioning]:
        if any(row.class_label is None for row in rows):
            raise ValueError(f"model {self.name} is class-conditional: every row needs a class label")
        return self.class_conditions(torch.tensor([row.class_label for row in rows]))

    def predict(self, x: torch.Tensor, t: torch.Tensor, cond: Conditioning) -> torch.Tensor:
        out = self.transformer(x.to(self.dtype), timestep=t, class_labels=cond["class_labels"]).sample
        return out[:, : self.latent_channels].float()  # (B, C, *S): learned sigma dropped

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        return decode_kl(self.vae, latents)
