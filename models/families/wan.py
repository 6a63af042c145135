"""Wan 2.1 text-to-video (WanPipeline): a space-time DiT with UMT5 cross-attention and a causal 3D VAE.

Differences from the other families, all here: the condition is a UMT5 encoding of the cleaned prompt,
cut at its length and zero-padded (no attention mask); the unconditional row is the negative prompt's
("" by default); latents are (C, 1 + (F - 1) / 4, H / 8, W / 8) and are un-normalised with the VAE's
per-channel mean and std before the 3D decode. The pipeline runs the conditional and unconditional
passes one after the other; the sampler runs them as one batch, which changes nothing but speed.
"""

from pathlib import Path
from typing import Any

import torch
from diffusers.pipelines.wan.pipeline_wan import prompt_clean

from dit_serve.contract import ConditioningKind, JobKind, ModelDefaults, ModelSpec
from models.families.base import (
    Conditioning,
    LoadedModel,
    RowCondition,
    to_uint8,
)
from models.families.class_dit import ModelConfigError
from models.families.text import encode_texts

MAX_TOKENS = 512  # WanPipeline's max_sequence_length
DEFAULT_STEPS = 50  # WanPipeline's defaults
DEFAULT_GUIDANCE = 5.0
DEFAULT_FRAMES = 81
SIZES = ["832x480", "480x832"]  # Wan 2.1's 480p sizes (the 1.3B model's); 14B also takes 720p
MAX_PIXELS = 1280 * 720


class Wan(LoadedModel):
    family = "wan"
    kind = JobKind.VIDEO
    conditioning = ConditioningKind.TEXT

    def __init__(self, name: str, path: Path, components: dict[str, Any], index: dict[str, Any]):
        super().__init__(name, path, components, index)
        if (
            index.get("transformer_2", [None])[0]
            or index.get("boundary_ratio")
            or index.get("expand_timesteps")
        ):
            raise ModelConfigError(
                "Wan 2.2 checkpoints (two experts or per-token timesteps) are not supported; serve Wan 2.1"
            )
        self.text_encoder: Any = components["text_encoder"]
        self.tokenizer = components["tokenizer"]
        self.temporal_factor = int(self.vae.config.scale_factor_temporal)
        self.spatial_factor = int(self.vae.config.scale_factor_spatial)
        patch = self.transformer.config.patch_size  # (frames, height, width)
        self.size_multiple = self.spatial_factor * int(patch[1])

    def spec(self) -> ModelSpec:
        return self._spec(
            SIZES,
            ModelDefaults(
                num_inference_steps=DEFAULT_STEPS, guidance_scale=DEFAULT_GUIDANCE, num_frames=DEFAULT_FRAMES
            ),
            size_multiple=self.size_multiple,
            max_pixels=MAX_PIXELS,
            max_frames=DEFAULT_FRAMES,
            frames_multiple=self.temporal_factor,
        )

    def latent_shape(self, width: int, height: int, frames: int) -> tuple[int, ...]:
        latent_frames = (frames - 1) // self.temporal_factor + 1
        return (
            self.latent_channels,
            latent_frames,
            height // self.spatial_factor,
            width // self.spatial_factor,
        )

    def conditions(self, rows: list[RowCondition]) -> tuple[Conditioning, Conditioning]:
        prompts = [prompt_clean(row.prompt or "") for row in rows]
        negatives = [prompt_clean(row.negative_prompt) for row in rows]
        encoded = encode_texts(self.tokenizer, self.text_encoder, prompts + negatives, MAX_TOKENS)
        embeddings = encoded.embeddings * encoded.mask.unsqueeze(-1).to(encoded.embeddings.dtype)  # (U, L, D)
        picks = {
            "cond": torch.tensor([encoded.index[text] for text in prompts]),
            "uncond": torch.tensor([encoded.index[text] for text in negatives]),
        }
        return (
            {"encoder_hidden_states": embeddings[picks["cond"].to(embeddings.device)]},
            {"encoder_hidden_states": embeddings[picks["uncond"].to(embeddings.device)]},
        )

    def predict(self, x: torch.Tensor, t: torch.Tensor, cond: Conditioning) -> torch.Tensor:
        out = self.transformer(
            hidden_states=x.to(self.dtype),
            timestep=t,
            encoder_hidden_states=cond["encoder_hidden_states"].to(self.dtype),
            return_dict=False,
        )[0]
        return out.float()  # (B, C, f, h, w)

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        config = self.vae.config
        latents = latents.to(self.vae.dtype)
        mean = torch.tensor(config.latents_mean).view(1, config.z_dim, 1, 1, 1).to(latents)
        std = torch.tensor(config.latents_std).view(1, config.z_dim, 1, 1, 1).to(latents)
        latents = latents * std + mean  # (N, C, f, h, w), the pipeline's latents / (1 / std) + mean
        # One clip per VAE call: the causal 3D decoder's activations grow with the clip, not the batch.
        videos = [self.vae.decode(clip, return_dict=False)[0] for clip in latents.split(1)]
        return to_uint8(torch.cat(videos))  # (N, F, H, W, 3)
