"""The recipes that made the shipped weights, and `dit-serve train image|video`."""

import logging
import time
from pathlib import Path

import torch
from diffusers import AutoencoderKL, DiTTransformer2DModel

from models.bundled import BUNDLED_DIR
from models.bundled import IMAGE_MODEL_NAME as IMAGE_MODEL
from models.bundled import VIDEO_MODEL_NAME as VIDEO_MODEL
from models.training import shapes
from models.training.train import CPU, Recipe, save_pipeline, train_image_dit, train_vae, train_video_dit

# Measured on 2 CPU cores when the shipped weights were trained: about 0.7 s a VAE step, 0.28 s an
# image-DiT step, 1.3-1.5 s a video-DiT step (3.3 s on a slow day).
VAE_RECIPE = Recipe(steps=500, batch_size=64, learning_rate=1e-3, seed=0, warmup_steps=50)
# v-prediction: a data-prediction solver (DPM-Solver++) gets x0 = a*x_t - s*v, which does not divide the
# model's error by a ~ 0.006 at high noise as x0 from eps does (the eps DiT fell to 72% at 10 steps).
# Seed 3 was picked after two seed-1 CPU runs drew rounded diamonds (89%); see the README.
IMAGE_RECIPE = Recipe(
    steps=4000, batch_size=64, learning_rate=3e-4, seed=3, ema_decay=0.999, prediction_type="v_prediction"
)
# v-prediction: at high noise the target is about -x0, so the label's effect on where the shape is in
# each frame (its direction) is an O(1) output, not a 0.1% change of eps.
VIDEO_RECIPE = Recipe(steps=900, batch_size=12, learning_rate=3e-4, seed=2, prediction_type="v_prediction")
VIDEO_WEIGHTS_DTYPE = (
    torch.float16
)  # halves the video transformer to fit the 30 MB budget for all bundled weights

log = logging.getLogger(__name__)


def train_image_model(out_dir: Path = BUNDLED_DIR, device: torch.device = CPU) -> Path:
    """VAE, then the class-conditional image DiT; writes out_dir/dit-shapes-image.

    On another device than the CPU the data and noise streams are the same (drawn on the CPU), but the
    arithmetic differs, so the weights are not bit-identical to the CPU recipe's.
    """
    start = time.monotonic()
    vae, vae_stats = train_vae(VAE_RECIPE, device)
    transformer, dit_stats = train_image_dit(vae, IMAGE_RECIPE, device=device)
    record = {
        "device": device.type,
        "vae": vae_stats,
        "transformer": dit_stats,
        "total_minutes": round((time.monotonic() - start) / 60, 1),
    }
    path = out_dir / IMAGE_MODEL
    save_pipeline(
        path,
        transformer,
        vae,
        shapes.image_labels(),
        video=False,
        record=record,
        prediction_type=IMAGE_RECIPE.prediction_type,
    )
    log.info("image model written to %s: %s", path, record)
    return path


def train_video_model(out_dir: Path = BUNDLED_DIR, device: torch.device = CPU) -> Path:
    """The space-time video DiT, started from the image model's DiT, over its VAE (train images first)."""
    image_dir = out_dir / IMAGE_MODEL
    if not (image_dir / "transformer").is_dir():
        raise SystemExit(
            f"{image_dir} not found: run `dit-serve train image` first; "
            "the video model starts from its DiT and VAE"
        )
    start = time.monotonic()
    vae = AutoencoderKL.from_pretrained(image_dir / "vae").eval().to(device)
    image_dit = DiTTransformer2DModel.from_pretrained(image_dir / "transformer").eval()
    transformer, dit_stats = train_video_dit(vae, VIDEO_RECIPE, image_dit, device)
    record = {
        "device": device.type,
        "vae": f"reused from {IMAGE_MODEL}",
        "initialised_from": f"{IMAGE_MODEL} transformer",
        "transformer": dit_stats,
        "total_minutes": round((time.monotonic() - start) / 60, 1),
    }
    path = out_dir / VIDEO_MODEL
    save_pipeline(
        path,
        transformer,
        vae,
        shapes.video_labels(),
        video=True,
        record=record,
        transformer_dtype=VIDEO_WEIGHTS_DTYPE,
        prediction_type=VIDEO_RECIPE.prediction_type,
    )
    log.info("video model written to %s: %s", path, record)
    return path
