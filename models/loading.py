"""Load a diffusers-format pipeline directory into the components the batched sampler needs.

The directory is what `DiffusionPipeline.save_pretrained` writes: `model_index.json` naming each
component's library and class, one sub-folder per component, and (for class-conditional DiTs)
`id2label`. The same code loads facebook/DiT-XL-2-256 and the project's own models.
"""

import importlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import diffusers
import torch
from diffusers import AutoencoderKL
from diffusers.schedulers.scheduling_utils import SchedulerMixin

MODEL_INDEX = "model_index.json"
# Classes our own modules may contribute to model_index.json; nothing else is imported by name.
LOCAL_LIBRARIES = {"models.space_time_dit": {"SpaceTimeDiTModel"}}
# (transformer class, kind, family) for every transformer the sampler knows how to drive.
FAMILIES = {
    "DiTTransformer2DModel": ("image", "dit"),
    "Transformer2DModel": ("image", "dit"),  # how facebook/DiT-XL-2-256 names its DiT transformer
    "SpaceTimeDiTModel": ("video", "dit-video"),
}
DEFAULT_STEPS = 25
DEFAULT_GUIDANCE = 4.0


class ModelLoadError(RuntimeError):
    """A model directory is missing, incomplete, or holds something the service cannot run."""


@dataclass
class LoadedModel:
    """A model's components on their device, plus what clients may ask of it."""

    name: str
    path: Path
    kind: str
    family: str
    transformer: torch.nn.Module
    vae: AutoencoderKL
    scheduler: SchedulerMixin
    labels: list[str]
    label_ids: dict[str, int] = field(repr=False)
    null_class_id: int
    latent_channels: int
    latent_size: int
    vae_scale_factor: int
    max_frames: int | None

    @property
    def native_size(self) -> int:
        return self.latent_size * self.vae_scale_factor

    @property
    def default_frames(self) -> int | None:
        return self.max_frames

    def new_scheduler(self) -> SchedulerMixin:
        """A fresh scheduler per batch: schedulers keep per-run state (timesteps, multistep history)."""
        return type(self.scheduler).from_config(self.scheduler.config)


def _component_class(library: str, class_name: str) -> Any:
    if library == "diffusers" or library.startswith("diffusers."):
        if not hasattr(diffusers, class_name):
            raise ModelLoadError(
                f"diffusers {diffusers.__version__} has no class {class_name}; upgrade diffusers"
            )
        return getattr(diffusers, class_name)
    if class_name in LOCAL_LIBRARIES.get(library, set()):
        return getattr(importlib.import_module(library), class_name)
    raise ModelLoadError(f"component class {library}.{class_name} is not one dit-serve can load")


def read_labels(index: dict[str, Any]) -> tuple[list[str], dict[str, int]]:
    """Each class id's id2label entry, and every name in it (comma-separated synonyms) to its id.

    This is `DiTPipeline.get_label_ids`' mapping.
    """
    id2label = index.get("id2label") or {}
    names = [""] * (max((int(key) for key in id2label), default=-1) + 1)
    label_ids: dict[str, int] = {}
    for key, value in id2label.items():
        synonyms = [part.strip() for part in str(value).split(",") if part.strip()]
        names[int(key)] = ", ".join(synonyms)
        for synonym in synonyms:
            label_ids.setdefault(synonym, int(key))
    return names, label_ids


def load_model(
    name: str, path: Path, device: torch.device, dtype: torch.dtype = torch.float32
) -> LoadedModel:
    """Load a pipeline directory.

    Args:
        name: the name clients use for this model.
        path: a diffusers-format pipeline directory on local disk.
        device: where the transformer and VAE run.
        dtype: their weights' dtype.

    Returns:
        The loaded model, in eval mode, on `device`.
    """
    index_file = path / MODEL_INDEX
    if not index_file.is_file():
        raise ModelLoadError(
            f"model {name!r}: {index_file} not found; SOURCE must be a diffusers pipeline directory"
        )
    index = json.loads(index_file.read_text())
    components: dict[str, Any] = {}
    for component in ("transformer", "vae", "scheduler"):
        if component not in index:
            raise ModelLoadError(f"model {name!r}: {index_file} names no {component}")
        library, class_name = index[component]
        cls = _component_class(library, class_name)
        if component == "transformer" and class_name == "Transformer2DModel":
            cls = diffusers.DiTTransformer2DModel  # DiT-XL-2-256's config says Transformer2DModel
        kwargs = {} if component == "scheduler" else {"torch_dtype": dtype}
        components[component] = cls.from_pretrained(path / component, **kwargs)

    transformer, vae = components["transformer"], components["vae"]
    transformer_class = index["transformer"][1]
    if transformer_class not in FAMILIES:
        raise ModelLoadError(f"model {name!r}: transformer {transformer_class} is not a supported DiT family")
    kind, family = FAMILIES[transformer_class]
    labels, label_ids = read_labels(index)
    config = transformer.config
    if not labels:
        raise ModelLoadError(f"model {name!r}: class-conditional DiT without id2label in {index_file}")
    null_class_id = config.num_embeds_ada_norm
    if len(labels) > null_class_id:
        raise ModelLoadError(
            f"model {name!r}: {len(labels)} labels but only {null_class_id} class embeddings"
        )
    return LoadedModel(
        name=name,
        path=path,
        kind=kind,
        family=family,
        transformer=transformer.to(device).eval(),
        vae=vae.to(device).eval(),
        scheduler=components["scheduler"],
        labels=labels,
        label_ids=label_ids,
        null_class_id=null_class_id,
        latent_channels=config.in_channels,
        latent_size=config.sample_size,
        vae_scale_factor=2 ** (len(vae.config.block_out_channels) - 1),
        max_frames=getattr(config, "num_frames", None) if kind == "video" else None,
    )
