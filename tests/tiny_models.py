"""Tiny randomly initialised DiT pipelines, built from config and saved to disk, for the tests.

They are real diffusers-format directories (latent diffusion through a VAE, adaLN-Zero DiTs, CFG),
so the tests run the real loading and sampling code, but fast and with random weights; the service's
default models are the trained ones in models/bundled.
"""

import json
from pathlib import Path

import diffusers
import torch
from diffusers import AutoencoderKL, DDIMScheduler, DiTTransformer2DModel

from models.shapes_vae import IMAGE_SIZE, LATENT_CHANNELS, build_shapes_vae
from models.space_time_dit import SpaceTimeDiTModel

NULL_CLASS_ID = 1000  # DiTPipeline hard-codes 1000 as the CFG null class, so keep 1000 embeddings
VIDEO_FRAMES = 16
HEAD_DIM = 16
COLOURS = ("red", "green", "blue", "yellow", "magenta", "cyan")
SHAPES = ("circle", "square", "triangle", "diamond")
# Random weights at this scale give every layer (adaLN-Zero gates included) a visible effect; class
# embeddings get nn.Embedding's usual N(0, 1) so that labels and CFG change the picture.
INIT_STD = 0.1
EMBEDDING_STD = 1.0


def shape_labels() -> list[str]:
    return [f"{colour} {shape}" for colour in COLOURS for shape in SHAPES]


def _randomise(module: torch.nn.Module, generator: torch.Generator) -> None:
    """Overwrite every parameter, so zero-initialised adaLN-Zero layers do not make the output zero."""
    with torch.no_grad():
        for name, param in module.named_parameters():
            std = EMBEDDING_STD if "embedding_table" in name else INIT_STD
            param.copy_(torch.randn(param.shape, generator=generator) * std)


def _vae(generator: torch.Generator) -> AutoencoderKL:
    vae = build_shapes_vae()
    _randomise(vae, generator)
    return vae


def _scheduler() -> DDIMScheduler:
    # DiT's training schedule: 1000 linear betas from 1e-4 to 0.02.
    return DDIMScheduler(beta_schedule="linear", beta_start=1e-4, beta_end=0.02, clip_sample=False)


def _write_index(path: Path, class_name: str, transformer: tuple[str, str], labels: list[str]) -> None:
    index = {
        "_class_name": class_name,
        "_diffusers_version": diffusers.__version__,
        "transformer": list(transformer),
        "vae": ["diffusers", "AutoencoderKL"],
        "scheduler": ["diffusers", "DDIMScheduler"],
        "id2label": {str(i): label for i, label in enumerate(labels)},
    }
    (path / "model_index.json").write_text(json.dumps(index, indent=2))


def build_tiny_image_model(path: Path, seed: int = 0, num_layers: int = 2, num_heads: int = 2) -> Path:
    """Save a random class-conditional DiT image pipeline (DiTPipeline layout) to `path`."""
    generator = torch.Generator().manual_seed(seed)
    transformer = DiTTransformer2DModel(
        num_attention_heads=num_heads,
        attention_head_dim=HEAD_DIM,
        in_channels=LATENT_CHANNELS,
        out_channels=2 * LATENT_CHANNELS,  # learned sigma, like DiT-XL/2
        num_layers=num_layers,
        sample_size=IMAGE_SIZE // 4,
        patch_size=2,
        num_embeds_ada_norm=NULL_CLASS_ID,
    )
    _randomise(transformer, generator)
    path.mkdir(parents=True, exist_ok=True)
    transformer.save_pretrained(path / "transformer")
    _vae(generator).save_pretrained(path / "vae")
    _scheduler().save_pretrained(path / "scheduler")
    _write_index(path, "DiTPipeline", ("diffusers", "DiTTransformer2DModel"), shape_labels())
    return path


def build_tiny_video_model(path: Path, seed: int = 0, num_layers: int = 1, num_heads: int = 2) -> Path:
    """Save a random class-conditional space-time DiT video pipeline to `path`."""
    generator = torch.Generator().manual_seed(seed)
    transformer = SpaceTimeDiTModel(
        sample_size=IMAGE_SIZE // 4,
        num_frames=VIDEO_FRAMES,
        patch_size=2,
        in_channels=LATENT_CHANNELS,
        num_layers=num_layers,
        num_attention_heads=num_heads,
        attention_head_dim=HEAD_DIM,
        num_embeds_ada_norm=NULL_CLASS_ID,
    )
    _randomise(transformer, generator)
    path.mkdir(parents=True, exist_ok=True)
    transformer.save_pretrained(path / "transformer")
    _vae(generator).save_pretrained(path / "vae")
    _scheduler().save_pretrained(path / "scheduler")
    labels = [
        f"{label} moving {direction}"
        for label in shape_labels()
        for direction in ("left", "right", "up", "down")
    ]
    _write_index(path, "SpaceTimeDiTPipeline", ("models.space_time_dit", "SpaceTimeDiTModel"), labels)
    return path
