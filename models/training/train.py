"""Train the bundled models on generated shapes: a VAE, a latent image DiT, a space-time video DiT.

The recipe follows DiT (Peebles & Xie, 2023) at toy scale: a KL autoencoder maps 32x32x3 images to
8x8x4 latents (scaled to unit variance, like Stable Diffusion's 0.18215), and a DiT with adaLN-Zero is
trained to predict the noise (eps) added at a random timestep of a 1000-step linear schedule, with
the label replaced by the null class 10% of the time so one network also makes the unconditional
prediction that classifier-free guidance needs. Seeds fix everything but the order of CPU float sums.
"""

import json
import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import diffusers
import numpy as np
import torch
import torch.nn.functional as F
from diffusers import AutoencoderKL, DDIMScheduler, DDPMScheduler, DiTTransformer2DModel
from tqdm import tqdm

from models.shapes_vae import LATENT_CHANNELS, build_shapes_vae
from models.space_time_dit import SpaceTimeDiTModel
from models.training import shapes

NULL_CLASS_ID = 1000  # DiTPipeline hard-codes 1000 as the CFG null class
LABEL_DROPOUT = 0.1  # as in DiT: trains the unconditional prediction used by CFG
KL_WEIGHT = 1e-6
TRAIN_TIMESTEPS = 1000
BETA_START, BETA_END = 1e-4, 0.02  # DiT's linear schedule
SCALE_SAMPLES = 2048  # images used to measure the latent std for the scaling factor


@dataclass(frozen=True)
class Recipe:
    """Everything that decides a training run."""

    steps: int
    batch_size: int
    learning_rate: float
    seed: int = 0
    warmup_steps: int = 200


def _scheduler_kwargs() -> dict:
    return {
        "num_train_timesteps": TRAIN_TIMESTEPS,
        "beta_schedule": "linear",
        "beta_start": BETA_START,
        "beta_end": BETA_END,
    }


def _to_tensor(pixels: np.ndarray) -> torch.Tensor:
    """uint8 (..., H, W, 3) -> float (..., 3, H, W) in [-1, 1]."""
    x = torch.from_numpy(pixels).float() / 127.5 - 1
    return x.movedim(-1, -3)


def _lr_lambda(recipe: Recipe) -> Callable[[int], float]:
    def schedule(step: int) -> float:  # linear warm-up, then cosine decay to 10%
        if step < recipe.warmup_steps:
            return (step + 1) / recipe.warmup_steps
        progress = (step - recipe.warmup_steps) / max(1, recipe.steps - recipe.warmup_steps)
        return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress))

    return schedule


def _loop(
    model: torch.nn.Module,
    recipe: Recipe,
    loss_fn: Callable[[np.random.Generator, torch.Generator], torch.Tensor],
    name: str,
) -> dict:
    """The shared training loop: AdamW, warm-up + cosine, gradient clipping, a progress bar with the loss."""
    torch.manual_seed(recipe.seed)
    rng = np.random.default_rng(recipe.seed)
    generator = torch.Generator().manual_seed(recipe.seed)
    optimiser = torch.optim.AdamW(model.parameters(), lr=recipe.learning_rate, weight_decay=0.0)
    lr_schedule = torch.optim.lr_scheduler.LambdaLR(optimiser, _lr_lambda(recipe))
    model.train()
    start, smoothed = time.monotonic(), None
    bar = tqdm(range(recipe.steps), desc=name, mininterval=2.0)
    for _step in bar:
        loss = loss_fn(rng, generator)
        optimiser.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimiser.step()
        lr_schedule.step()
        smoothed = loss.item() if smoothed is None else 0.98 * smoothed + 0.02 * loss.item()
        bar.set_postfix(loss=f"{smoothed:.4f}", refresh=False)
    model.eval()
    return {
        "steps": recipe.steps,
        "final_loss": round(float(smoothed or 0.0), 5),
        "minutes": round((time.monotonic() - start) / 60, 1),
    }


def train_vae(recipe: Recipe) -> tuple[AutoencoderKL, dict]:
    """Reconstruction (MSE) + a tiny KL term; then set scaling_factor so latents have unit variance."""
    vae = build_shapes_vae()

    def loss_fn(rng: np.random.Generator, generator: torch.Generator) -> torch.Tensor:
        x = _to_tensor(shapes.image_batch(rng, recipe.batch_size)[0])  # (N, 3, H, W)
        posterior = vae.encode(x).latent_dist
        z = posterior.mean + posterior.std * torch.randn(
            posterior.mean.shape, generator=generator
        )  # (N, 4, h, w)
        return F.mse_loss(vae.decode(z).sample, x) + KL_WEIGHT * posterior.kl().mean()

    stats = _loop(vae, recipe, loss_fn, "vae")
    with torch.no_grad():
        x = _to_tensor(shapes.image_batch(np.random.default_rng(recipe.seed + 1), SCALE_SAMPLES)[0])
        std = float(torch.cat([vae.encode(chunk).latent_dist.mean for chunk in x.split(256)]).std())
    vae.register_to_config(scaling_factor=1.0 / std)
    return vae, {**stats, "scaling_factor": round(1.0 / std, 5)}


def _encode(vae: AutoencoderKL, x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Scaled latents sampled from the posterior, (N, 4, h, w)."""
    with torch.no_grad():
        posterior = vae.encode(x).latent_dist
        z = posterior.mean + posterior.std * torch.randn(posterior.mean.shape, generator=generator)
    return z * vae.config.scaling_factor


def _disable_block_label_dropout(model: torch.nn.Module) -> None:
    """diffusers drops labels inside every block independently; we drop once per sample instead."""
    for module in model.modules():
        if hasattr(module, "class_embedder"):
            module.class_embedder.dropout_prob = 0.0


def _eps_loss(
    model: torch.nn.Module,
    noise_scheduler: DDPMScheduler,
    z: torch.Tensor,
    labels: torch.Tensor,
    generator: torch.Generator,
) -> torch.Tensor:
    """DiT's simple loss: MSE between the added noise and the predicted noise."""
    n = z.shape[0]
    t = torch.randint(0, TRAIN_TIMESTEPS, (n,), generator=generator)  # (N,)
    eps = torch.randn(z.shape, generator=generator)
    drop = torch.rand(n, generator=generator) < LABEL_DROPOUT
    y = torch.where(drop, torch.full_like(labels, NULL_CLASS_ID), labels)  # (N,)
    x_t = noise_scheduler.add_noise(z, eps, t)
    prediction = model(x_t, timestep=t, class_labels=y).sample[:, : z.shape[1]]
    return F.mse_loss(prediction, eps)


def train_image_dit(
    vae: AutoencoderKL, recipe: Recipe, hidden_heads: int = 4, num_layers: int = 4
) -> tuple[DiTTransformer2DModel, dict]:
    model = DiTTransformer2DModel(
        num_attention_heads=hidden_heads,
        attention_head_dim=32,
        in_channels=LATENT_CHANNELS,
        out_channels=LATENT_CHANNELS,
        num_layers=num_layers,
        sample_size=shapes.IMAGE_SIZE // 4,
        patch_size=1,  # 64 tokens: each latent pixel is a token
        num_embeds_ada_norm=NULL_CLASS_ID,
    )
    _disable_block_label_dropout(model)
    noise_scheduler = DDPMScheduler(**_scheduler_kwargs())

    def loss_fn(rng: np.random.Generator, generator: torch.Generator) -> torch.Tensor:
        pixels, labels = shapes.image_batch(rng, recipe.batch_size)
        z = _encode(vae, _to_tensor(pixels), generator)  # (N, 4, 8, 8)
        return _eps_loss(model, noise_scheduler, z, torch.from_numpy(labels), generator)

    return model, _loop(model, recipe, loss_fn, "image dit")


def train_video_dit(
    vae: AutoencoderKL, recipe: Recipe, num_layers: int = 4, hidden_heads: int = 4
) -> tuple[SpaceTimeDiTModel, dict]:
    model = SpaceTimeDiTModel(
        sample_size=shapes.IMAGE_SIZE // 4,
        num_frames=shapes.NUM_FRAMES,
        patch_size=2,
        in_channels=LATENT_CHANNELS,
        num_layers=num_layers,
        num_attention_heads=hidden_heads,
        attention_head_dim=32,
        num_embeds_ada_norm=NULL_CLASS_ID,
    )
    _disable_block_label_dropout(model)
    noise_scheduler = DDPMScheduler(**_scheduler_kwargs())

    def loss_fn(rng: np.random.Generator, generator: torch.Generator) -> torch.Tensor:
        pixels, labels = shapes.video_batch(rng, recipe.batch_size)  # (N, F, H, W, 3)
        n, f = pixels.shape[:2]
        z = _encode(vae, _to_tensor(pixels.reshape(n * f, *pixels.shape[2:])), generator)  # (N*F, 4, 8, 8)
        z = z.reshape(n, f, *z.shape[1:]).transpose(1, 2)  # (N, 4, F, 8, 8)
        return _eps_loss(model, noise_scheduler, z, torch.from_numpy(labels), generator)

    return model, _loop(model, recipe, loss_fn, "video dit")


def save_pipeline(
    path: Path, transformer: torch.nn.Module, vae: AutoencoderKL, labels: list[str], video: bool, record: dict
) -> None:
    """Write a diffusers-format pipeline directory (DiTPipeline layout for the image model)."""
    path.mkdir(parents=True, exist_ok=True)
    transformer.save_pretrained(path / "transformer")
    vae.save_pretrained(path / "vae")
    DDIMScheduler(**_scheduler_kwargs(), clip_sample=False, set_alpha_to_one=False).save_pretrained(
        path / "scheduler"
    )
    transformer_entry = (
        ["models.space_time_dit", "SpaceTimeDiTModel"] if video else ["diffusers", "DiTTransformer2DModel"]
    )
    index = {
        "_class_name": "SpaceTimeDiTPipeline" if video else "DiTPipeline",
        "_diffusers_version": diffusers.__version__,
        "transformer": transformer_entry,
        "vae": ["diffusers", "AutoencoderKL"],
        "scheduler": ["diffusers", "DDIMScheduler"],
        "id2label": {str(i): label for i, label in enumerate(labels)},
    }
    (path / "model_index.json").write_text(json.dumps(index, indent=2) + "\n")
    (path / "training.json").write_text(json.dumps(record, indent=2) + "\n")
