"""The recipes that made the shipped weights, and `dit-serve train image|video`."""

import logging
import time
from pathlib import Path

from diffusers import AutoencoderKL

from models.bundled import BUNDLED_DIR
from models.bundled import IMAGE_MODEL_NAME as IMAGE_MODEL
from models.bundled import VIDEO_MODEL_NAME as VIDEO_MODEL
from models.training import shapes
from models.training.train import Recipe, save_pipeline, train_image_dit, train_vae, train_video_dit

# Measured on 2 CPU cores: about 0.5 s a VAE step, 0.25 s an image-DiT step, 0.5 s a video-DiT step.
VAE_RECIPE = Recipe(steps=500, batch_size=64, learning_rate=1e-3, seed=0, warmup_steps=50)
IMAGE_RECIPE = Recipe(steps=4000, batch_size=64, learning_rate=3e-4, seed=1)
VIDEO_RECIPE = Recipe(steps=4000, batch_size=12, learning_rate=3e-4, seed=2)

log = logging.getLogger(__name__)


def train_image_model(out_dir: Path = BUNDLED_DIR) -> Path:
    """VAE, then the class-conditional image DiT; writes out_dir/dit-shapes-image."""
    start = time.monotonic()
    vae, vae_stats = train_vae(VAE_RECIPE)
    transformer, dit_stats = train_image_dit(vae, IMAGE_RECIPE)
    record = {
        "vae": vae_stats,
        "transformer": dit_stats,
        "total_minutes": round((time.monotonic() - start) / 60, 1),
    }
    path = out_dir / IMAGE_MODEL
    save_pipeline(path, transformer, vae, shapes.image_labels(), video=False, record=record)
    log.info("image model written to %s: %s", path, record)
    return path


def train_video_model(out_dir: Path = BUNDLED_DIR) -> Path:
    """The space-time video DiT over the image model's VAE (train the image model first)."""
    vae_dir = out_dir / IMAGE_MODEL / "vae"
    if not vae_dir.is_dir():
        raise SystemExit(
            f"{vae_dir} not found: run `dit-serve train image` first, the video model reuses its VAE"
        )
    start = time.monotonic()
    vae = AutoencoderKL.from_pretrained(vae_dir).eval()
    transformer, dit_stats = train_video_dit(vae, VIDEO_RECIPE)
    record = {
        "vae": f"reused from {IMAGE_MODEL}",
        "transformer": dit_stats,
        "total_minutes": round((time.monotonic() - start) / 60, 1),
    }
    path = out_dir / VIDEO_MODEL
    save_pipeline(path, transformer, vae, shapes.video_labels(), video=True, record=record)
    log.info("video model written to %s: %s", path, record)
    return path
