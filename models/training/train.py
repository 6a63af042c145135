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
from torch import nn
from torch.nn.utils import parametrize
from tqdm import tqdm

from models.shapes_vae import LATENT_CHANNELS, build_shapes_vae
from models.space_time_dit import SpaceTimeDiTModel
from models.training import shapes

NULL_CLASS_ID = 1000  # DiTPipeline hard-codes 1000 as the CFG null class
LABEL_DROPOUT = 0.1  # as in DiT: trains the unconditional prediction used by CFG
KL_WEIGHT = 1e-6
TRAIN_TIMESTEPS = 1000
BETA_START, BETA_END = 1e-4, 0.02  # DiT's linear schedule
TEMPORAL_DIRECTION_INIT_STD = 1.0  # see _SharedDirectionOffsets
SCALE_SAMPLES = 2048  # images used to measure the latent std for the scaling factor
CPU = torch.device("cpu")


@dataclass(frozen=True)
class Recipe:
    """Everything that decides a training run."""

    steps: int
    batch_size: int
    learning_rate: float
    seed: int = 0
    warmup_steps: int = 200
    ema_decay: float | None = None  # keep an exponential moving average of the weights and ship it, as DiT
    noise_weight_cap: float | None = None  # see _diffusion_loss
    prediction_type: str = "epsilon"  # or "v_prediction"; written into the saved scheduler config


def _scheduler_kwargs() -> dict:
    return {
        "num_train_timesteps": TRAIN_TIMESTEPS,
        "beta_schedule": "linear",
        "beta_start": BETA_START,
        "beta_end": BETA_END,
    }


def _to_tensor(pixels: np.ndarray, device: torch.device = CPU) -> torch.Tensor:
    """uint8 (..., H, W, 3) -> float (..., 3, H, W) in [-1, 1], on device."""
    x = torch.from_numpy(pixels).to(device).float() / 127.5 - 1
    return x.movedim(-1, -3)


def _randn(shape: torch.Size, generator: torch.Generator, device: torch.device) -> torch.Tensor:
    """Noise drawn from the CPU generator, then moved: one seed gives one noise stream on any device."""
    return torch.randn(shape, generator=generator).to(device)


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
    """The shared training loop: AdamW, warm-up + cosine, gradient clipping, a progress bar with the loss.

    With recipe.ema_decay, the model ends with the moving average of its weights (DiT samples from an
    EMA of decay 0.9999 too): smoother predictions from one timestep to the next.
    """
    torch.manual_seed(recipe.seed)
    rng = np.random.default_rng(recipe.seed)
    generator = torch.Generator().manual_seed(recipe.seed)
    optimiser = torch.optim.AdamW(model.parameters(), lr=recipe.learning_rate, weight_decay=0.0)
    lr_schedule = torch.optim.lr_scheduler.LambdaLR(optimiser, _lr_lambda(recipe))
    params = [param for param in model.parameters() if param.requires_grad]
    ema = None if recipe.ema_decay is None else [param.detach().clone() for param in params]
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
        if ema is not None:
            with torch.no_grad():
                for average, param in zip(ema, params, strict=True):
                    average.lerp_(param, 1.0 - recipe.ema_decay)
        smoothed = loss.item() if smoothed is None else 0.98 * smoothed + 0.02 * loss.item()
        bar.set_postfix(loss=f"{smoothed:.4f}", refresh=False)
    if ema is not None:
        with torch.no_grad():
            for average, param in zip(ema, params, strict=True):
                param.copy_(average)
    model.eval()
    return {
        "steps": recipe.steps,
        "final_loss": round(float(smoothed or 0.0), 5),
        "minutes": round((time.monotonic() - start) / 60, 1),
    }


def train_vae(recipe: Recipe, device: torch.device = CPU) -> tuple[AutoencoderKL, dict]:
    """Reconstruction (MSE) + a tiny KL term; then set scaling_factor so latents have unit variance."""
    vae = build_shapes_vae().to(device)

    def loss_fn(rng: np.random.Generator, generator: torch.Generator) -> torch.Tensor:
        x = _to_tensor(shapes.image_batch(rng, recipe.batch_size)[0], device)  # (N, 3, H, W)
        posterior = vae.encode(x).latent_dist
        z = posterior.mean + posterior.std * _randn(posterior.mean.shape, generator, device)  # (N, 4, h, w)
        return F.mse_loss(vae.decode(z).sample, x) + KL_WEIGHT * posterior.kl().mean()

    stats = _loop(vae, recipe, loss_fn, "vae")
    with torch.no_grad():
        x = _to_tensor(shapes.image_batch(np.random.default_rng(recipe.seed + 1), SCALE_SAMPLES)[0], device)
        std = float(torch.cat([vae.encode(chunk).latent_dist.mean for chunk in x.split(256)]).std())
    vae.register_to_config(scaling_factor=1.0 / std)
    return vae, {**stats, "scaling_factor": round(1.0 / std, 5)}


def _encode(vae: AutoencoderKL, x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Scaled latents sampled from the posterior, (N, 4, h, w)."""
    with torch.no_grad():
        posterior = vae.encode(x).latent_dist
        z = posterior.mean + posterior.std * _randn(posterior.mean.shape, generator, x.device)
    return z * vae.config.scaling_factor


def _disable_block_label_dropout(model: torch.nn.Module) -> None:
    """diffusers drops labels inside every block independently; we drop once per sample instead."""
    for module in model.modules():
        if hasattr(module, "class_embedder"):
            module.class_embedder.dropout_prob = 0.0


def _diffusion_loss(
    model: torch.nn.Module,
    noise_scheduler: DDPMScheduler,
    z: torch.Tensor,
    labels: torch.Tensor,
    generator: torch.Generator,
    noise_weight_cap: float | None = None,
    prediction_type: str = "epsilon",
) -> torch.Tensor:
    """DiT's simple loss: MSE between the added noise (or the velocity) and the model's prediction.

    prediction_type "v_prediction" (Salimans & Ho, 2022; CogVideoX trains so): the target is
    v = sqrt(a) eps - sqrt(1-a) x0, whose MSE is (1 + 1/SNR) times the eps MSE. At high noise, where
    x_t says almost nothing and the label must decide a clip's layout and motion, v is almost -x0, so
    getting the label's effect right there counts as much as anywhere else; eps-MSE all but ignores it.
    noise_weight_cap (eps only): weight each sample by 1/SNR(t) clamped to [1, cap], a milder form.
    """
    n, device = z.shape[0], z.device
    t = torch.randint(0, TRAIN_TIMESTEPS, (n,), generator=generator).to(device)  # (N,)
    eps = _randn(z.shape, generator, device)
    drop = (torch.rand(n, generator=generator) < LABEL_DROPOUT).to(device)
    y = torch.where(drop, torch.full_like(labels, NULL_CLASS_ID), labels)  # (N,)
    x_t = noise_scheduler.add_noise(z, eps, t)
    prediction = model(x_t, timestep=t, class_labels=y).sample[:, : z.shape[1]]
    if prediction_type == "v_prediction":
        return F.mse_loss(prediction, noise_scheduler.get_velocity(z, eps, t))
    if prediction_type != "epsilon":
        raise ValueError(f"prediction_type must be 'epsilon' or 'v_prediction', got {prediction_type!r}")
    if noise_weight_cap is None:
        return F.mse_loss(prediction, eps)
    alpha_bar = noise_scheduler.alphas_cumprod.to(device)[t]  # (N,)
    weight = ((1 - alpha_bar) / alpha_bar).clamp(1.0, noise_weight_cap)  # 1/SNR(t), (N,)
    per_sample = (prediction - eps).pow(2).flatten(1).mean(1)  # (N,)
    return (weight * per_sample).mean()


def train_image_dit(
    vae: AutoencoderKL,
    recipe: Recipe,
    hidden_heads: int = 4,
    num_layers: int = 4,
    device: torch.device = CPU,
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
    ).to(device)
    _disable_block_label_dropout(model)
    noise_scheduler = DDPMScheduler(**_scheduler_kwargs())

    def loss_fn(rng: np.random.Generator, generator: torch.Generator) -> torch.Tensor:
        pixels, labels = shapes.image_batch(rng, recipe.batch_size)
        z = _encode(vae, _to_tensor(pixels, device), generator)  # (N, 4, 8, 8)
        labels_t = torch.from_numpy(labels).to(device)  # (N,)
        return _diffusion_loss(
            model, noise_scheduler, z, labels_t, generator, recipe.noise_weight_cap, recipe.prediction_type
        )

    return model, _loop(model, recipe, loss_fn, "image dit")


class _SharedDirectionOffsets(nn.Module):
    """Training-time form of a video class table: each label's own row plus an offset shared by its direction.

    With 96 labels, a label's own row sees one batch in eight; the 4 direction offsets learn from every
    sample, so motion is learnt once for all stills. Baked into the plain table after training.

    init_std: offsets drawn from N(0, init_std^2), as nn.Embedding draws fresh rows. Zero offsets leave
    the four directions of a still with one embedding, and Adam at the DiT's learning rate moves a
    zero-started offset too little in a CPU budget for the label to ever decide the motion (measured:
    offsets of norm 0.04 after 1900 steps, direction at chance). Distinct rows from step 0 let the
    zero-initialised adaLN layers that read them learn direction as they learnt class in the image DiT.
    """

    def __init__(self, dim: int, init_std: float = 0.0):
        super().__init__()
        self.offsets = nn.Parameter(init_std * torch.randn(len(shapes.DIRECTIONS), dim))  # (4, D)
        num_labels = len(shapes.video_labels())
        self.register_buffer(
            "directions", torch.arange(num_labels) % len(shapes.DIRECTIONS), persistent=False
        )

    def forward(
        self, table: torch.Tensor
    ) -> torch.Tensor:  # (R, D) -> (R, D); rows past the labels unchanged
        num_labels = len(self.directions)
        return torch.cat([table[:num_labels] + self.offsets[self.directions], table[num_labels:]])


def init_from_image_dit(model: SpaceTimeDiTModel, image_dit: DiTTransformer2DModel) -> None:
    """Start the video DiT as the image DiT on every frame, as Latte starts from a text-to-image model.

    The spatial blocks, patch embedding and output layers take the image DiT's weights; each video label
    ("red circle moving left") starts from its still's label row ("red circle"); the temporal blocks keep
    their adaLN-Zero initialisation, so they start as the identity and training only has to add motion.
    Each temporal block's (timestep, label) embedding starts as its spatial twin's: it knows the still
    from the start, and the four directions of one still start equal, apart only by what training adds.
    """
    state = image_dit.state_dict()
    directions = len(shapes.DIRECTIONS)
    for key, value in list(state.items()):
        if key.endswith("class_embedder.embedding_table.weight"):  # (1001, D): stills, then the null row
            table = value.clone()
            video_ids = torch.arange(len(shapes.video_labels()))  # video id = still id * 4 + direction
            table[video_ids] = value[video_ids // directions]
            state[key] = table
    for key, value in list(state.items()):
        if key.startswith("transformer_blocks.") and ".norm1.emb." in key:
            state["temporal_" + key] = value.clone()
    missing, unexpected = model.load_state_dict(state, strict=False)
    if unexpected or any(not key.startswith("temporal_transformer_blocks.") for key in missing):
        raise ValueError(f"image DiT does not fit the video DiT: missing {missing}, unexpected {unexpected}")


def train_video_dit(
    vae: AutoencoderKL, recipe: Recipe, image_dit: DiTTransformer2DModel, device: torch.device = CPU
) -> tuple[SpaceTimeDiTModel, dict]:
    """The space-time DiT, initialised from the image DiT (same width, depth and patch size)."""
    image_config = image_dit.config
    model = SpaceTimeDiTModel(
        sample_size=image_config.sample_size,
        num_frames=shapes.NUM_FRAMES,
        patch_size=image_config.patch_size,
        in_channels=LATENT_CHANNELS,
        num_layers=image_config.num_layers,
        num_attention_heads=image_config.num_attention_heads,
        attention_head_dim=image_config.attention_head_dim,
        num_embeds_ada_norm=NULL_CLASS_ID,
    )
    init_from_image_dit(model, image_dit)
    _disable_block_label_dropout(model)
    tables = []
    for name, module in model.named_modules():
        if hasattr(module, "embedding_table"):
            # Temporal blocks start as the identity, so their directions can start apart at no cost to
            # the exact start from the image DiT; spatial blocks' offsets start at zero to keep it.
            init_std = TEMPORAL_DIRECTION_INIT_STD if name.startswith("temporal_") else 0.0
            offsets = _SharedDirectionOffsets(module.embedding_table.embedding_dim, init_std)
            parametrize.register_parametrization(module.embedding_table, "weight", offsets)
            tables.append(module.embedding_table)
    model.to(device)
    noise_scheduler = DDPMScheduler(**_scheduler_kwargs())

    def loss_fn(rng: np.random.Generator, generator: torch.Generator) -> torch.Tensor:
        pixels, labels = shapes.video_batch(rng, recipe.batch_size)  # (N, F, H, W, 3)
        n, f = pixels.shape[:2]
        x = _to_tensor(pixels.reshape(n * f, *pixels.shape[2:]), device)  # (N*F, 3, H, W)
        z = _encode(vae, x, generator)  # (N*F, 4, 8, 8)
        z = z.reshape(n, f, *z.shape[1:]).transpose(1, 2)  # (N, 4, F, 8, 8)
        labels_t = torch.from_numpy(labels).to(device)  # (N,)
        return _diffusion_loss(
            model, noise_scheduler, z, labels_t, generator, recipe.noise_weight_cap, recipe.prediction_type
        )

    stats = _loop(model, recipe, loss_fn, "video dit")
    for table in tables:  # bake the shared offsets into plain tables: the saved model is a plain SpaceTimeDiT
        parametrize.remove_parametrizations(table, "weight", leave_parametrized=True)
    return model, stats


def save_pipeline(
    path: Path,
    transformer: torch.nn.Module,
    vae: AutoencoderKL,
    labels: list[str],
    video: bool,
    record: dict,
    transformer_dtype: torch.dtype = torch.float32,
    prediction_type: str = "epsilon",
) -> None:
    """Write a diffusers-format pipeline directory (DiTPipeline layout for the image model).

    transformer_dtype: the dtype its weights are stored in (the loader casts to the serving dtype).
    prediction_type: what the transformer predicts, for the scheduler config (samplers read it there).
    """
    path.mkdir(parents=True, exist_ok=True)
    transformer.to(CPU, transformer_dtype).save_pretrained(path / "transformer")
    transformer.to(torch.float32)
    vae.to(CPU).save_pretrained(path / "vae")
    scheduler = DDIMScheduler(
        **_scheduler_kwargs(), clip_sample=False, set_alpha_to_one=False, prediction_type=prediction_type
    )
    scheduler.save_pretrained(path / "scheduler")
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
