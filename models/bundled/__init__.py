"""The bundled models: small DiTs trained by the project on generated shapes (see models/training)."""

from pathlib import Path

BUNDLED_DIR = Path(__file__).resolve().parent
IMAGE_MODEL_NAME = "dit-shapes-image"
VIDEO_MODEL_NAME = "dit-shapes-video"
IMAGE_MODEL_DIR = BUNDLED_DIR / IMAGE_MODEL_NAME
VIDEO_MODEL_DIR = BUNDLED_DIR / VIDEO_MODEL_NAME
LORAS_DIR = BUNDLED_DIR / "loras"
# The shipped LoRA adapters (`dit-serve train lora`), registered by a worker serving the bundled models.
BUNDLED_LORAS = {IMAGE_MODEL_NAME: {"outline": LORAS_DIR / "outline"}}
