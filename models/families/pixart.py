"""PixArt-α and PixArt-Σ: a DiT with T5 cross-attention (PixArtAlphaPipeline / PixArtSigmaPipeline).

Differences from the class-conditional DiT, all here: the condition is a T5 encoding of the prompt
with its attention mask, the unconditional row is the encoding of the negative prompt ("" by default),
PixArt-α at 1024 px also takes the resolution and aspect ratio, and learned sigma is dropped.
Prompts are lower-cased and stripped: the pipelines' preprocessing when caption cleaning is off
(it needs bs4 and ftfy, and is off in both pipelines' `encode_prompt` by default).
"""

from pathlib import Path
from typing import Any

import torch
from diffusers.pipelines.pixart_alpha.pipeline_pixart_alpha import (
    ASPECT_RATIO_256_BIN,
    ASPECT_RATIO_512_BIN,
    ASPECT_RATIO_1024_BIN,
)
from diffusers.pipelines.pixart_alpha.pipeline_pixart_sigma import ASPECT_RATIO_2048_BIN

from dit_serve.contract import ConditioningKind, JobKind, ModelDefaults, ModelSpec
from models.families.base import Conditioning, LoadedModel, RowCondition
from models.families.kl_vae import decode_kl
from models.families.text import encode_texts

SIGMA_PIPELINE = "PixArtSigmaPipeline"
MAX_TOKENS = {"PixArtAlphaPipeline": 120, SIGMA_PIPELINE: 300}  # the pipelines' max_sequence_length
MICRO_CONDITIONED_SAMPLE_SIZE = 128  # PixArt-α 1024 px takes resolution and aspect ratio
DEFAULT_STEPS = 20  # both pipelines' defaults
DEFAULT_GUIDANCE = 4.5
# The sizes each native resolution was trained on (the pipelines' resolution bins), by latent size.
ASPECT_RATIO_BINS = {
    32: ASPECT_RATIO_256_BIN,
    64: ASPECT_RATIO_512_BIN,
    128: ASPECT_RATIO_1024_BIN,
    256: ASPECT_RATIO_2048_BIN,
}


def _preprocess(text: str) -> str:
    return text.lower().strip()


class PixArt(LoadedModel):
    family = "pixart"
    kind = JobKind.IMAGE
    conditioning = ConditioningKind.TEXT

    def __init__(self, name: str, path: Path, components: dict[str, Any], index: dict[str, Any]):
        super().__init__(name, path, components, index)
        self.text_encoder: Any = components["text_encoder"]
        self.tokenizer = components["tokenizer"]
        pipeline = str(index.get("_class_name", ""))
        self.max_tokens = MAX_TOKENS.get(pipeline, MAX_TOKENS["PixArtAlphaPipeline"])
        self.latent_size = int(self.transformer.config.sample_size)
        self.micro_conditioned = (
            pipeline != SIGMA_PIPELINE and self.latent_size == MICRO_CONDITIONED_SAMPLE_SIZE
        )
        self.vae_scale_factor = 2 ** (len(self.vae.config.block_out_channels) - 1)

    def spec(self) -> ModelSpec:
        native = self.latent_size * self.vae_scale_factor
        sizes = [f"{native}x{native}"]
        for height, width in ASPECT_RATIO_BINS.get(self.latent_size, {}).values():
            size = f"{int(width)}x{int(height)}"
            if size not in sizes:
                sizes.append(size)
        return self._spec(
            sizes, ModelDefaults(num_inference_steps=DEFAULT_STEPS, guidance_scale=DEFAULT_GUIDANCE)
        )

    def latent_shape(self, width: int, height: int, frames: int) -> tuple[int, ...]:
        return (self.latent_channels, height // self.vae_scale_factor, width // self.vae_scale_factor)

    def conditions(self, rows: list[RowCondition]) -> tuple[Conditioning, Conditioning]:
        prompts = [_preprocess(row.prompt or "") for row in rows]
        negatives = [_preprocess(row.negative_prompt) for row in rows]
        encoded = encode_texts(self.tokenizer, self.text_encoder, prompts + negatives, self.max_tokens)
        cond_embeddings, cond_mask = encoded.rows(prompts)  # (N, L, D), (N, L)
        uncond_embeddings, uncond_mask = encoded.rows(negatives)
        return (
            {"encoder_hidden_states": cond_embeddings, "encoder_attention_mask": cond_mask},
            {"encoder_hidden_states": uncond_embeddings, "encoder_attention_mask": uncond_mask},
        )

    def _micro_conditions(self, x: torch.Tensor) -> dict[str, torch.Tensor | None]:
        if not self.micro_conditioned:
            return {"resolution": None, "aspect_ratio": None}
        height, width = x.shape[-2] * self.vae_scale_factor, x.shape[-1] * self.vae_scale_factor
        rows = x.shape[0]
        resolution = torch.tensor([height, width], dtype=self.dtype, device=x.device).repeat(rows, 1)
        aspect_ratio = torch.tensor([height / width], dtype=self.dtype, device=x.device).repeat(rows, 1)
        return {"resolution": resolution, "aspect_ratio": aspect_ratio}  # (B, 2), (B, 1)

    def predict(self, x: torch.Tensor, t: torch.Tensor, cond: Conditioning) -> torch.Tensor:
        out = self.transformer(
            x.to(self.dtype),
            encoder_hidden_states=cond["encoder_hidden_states"].to(self.dtype),
            encoder_attention_mask=cond["encoder_attention_mask"],
            timestep=t,
            added_cond_kwargs=self._micro_conditions(x),
            return_dict=False,
        )[0]
        return out[:, : self.latent_channels].float()  # (B, C, h, w): learned sigma dropped

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        return decode_kl(self.vae, latents)
