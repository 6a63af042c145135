"""Load a diffusers-format pipeline directory into its family's adapter (models/families).

The directory is what `DiffusionPipeline.save_pretrained` writes: `model_index.json` naming the
pipeline class and each component's library and class, and one sub-folder per component. The same
code loads facebook/DiT-XL-2-256, PixArt-α/Σ, Wan 2.1 and the project's own models.
"""

import importlib
import json
from pathlib import Path
from typing import Any

import diffusers
import torch

from models.families import PIPELINE_FAMILIES
from models.families.base import LoadedModel, RowCondition
from models.families.class_dit import ModelConfigError

__all__ = ["LoadedModel", "ModelLoadError", "RowCondition", "load_model"]

MODEL_INDEX = "model_index.json"
# Classes our own modules may contribute to model_index.json; nothing else is imported by name.
LOCAL_LIBRARIES = {"models.space_time_dit": {"SpaceTimeDiTModel"}}
# transformers classes a text-conditioned family may name (the T5 family and its tokenizers).
TEXT_CLASSES = {"T5EncoderModel", "UMT5EncoderModel", "T5Tokenizer", "T5TokenizerFast", "AutoTokenizer"}
LEGACY_TRANSFORMER = "Transformer2DModel"  # how DiT-XL-2 and PixArt-α repos name their transformer


class ModelLoadError(RuntimeError):
    """A model directory is missing, incomplete, or holds something the service cannot run."""


def _component_class(library: str, class_name: str) -> Any:
    if library == "diffusers" or library.startswith("diffusers."):
        if not hasattr(diffusers, class_name):
            raise ModelLoadError(
                f"diffusers {diffusers.__version__} has no class {class_name}; upgrade diffusers"
            )
        return getattr(diffusers, class_name)
    if library == "transformers" and class_name in TEXT_CLASSES:
        try:
            transformers = importlib.import_module("transformers")
        except ImportError as exc:
            raise ModelLoadError(
                "text-conditioned models need `transformers`: pip install 'dit-serve[worker]'"
            ) from exc
        return getattr(transformers, class_name)
    if class_name in LOCAL_LIBRARIES.get(library, set()):
        return getattr(importlib.import_module(library), class_name)
    raise ModelLoadError(f"component class {library}.{class_name} is not one dit-serve can load")


def _load_component(path: Path, library: str, class_name: str, dtype: torch.dtype) -> Any:
    cls = _component_class(library, class_name)
    if class_name.endswith(("Tokenizer", "TokenizerFast")) or "Scheduler" in class_name:
        return cls.from_pretrained(path)
    if library == "transformers":
        return cls.from_pretrained(path, dtype=dtype)
    return cls.from_pretrained(path, torch_dtype=dtype)


def load_model(
    name: str, path: Path, device: torch.device, dtype: torch.dtype = torch.float32
) -> LoadedModel:
    """Load a pipeline directory.

    Args:
        name: the name clients use for this model.
        path: a diffusers-format pipeline directory on local disk.
        device: where the transformer, VAE and text encoder run.
        dtype: their weights' dtype.

    Returns:
        The family adapter holding the components, in eval mode, on `device`.
    """
    index_file = path / MODEL_INDEX
    if not index_file.is_file():
        raise ModelLoadError(
            f"model {name!r}: {index_file} not found; SOURCE must be a diffusers pipeline directory"
        )
    index = json.loads(index_file.read_text())
    pipeline = index.get("_class_name")
    if pipeline not in PIPELINE_FAMILIES:
        supported = ", ".join(sorted(PIPELINE_FAMILIES))
        raise ModelLoadError(
            f"model {name!r}: pipeline {pipeline} is not a supported DiT family ({supported})"
        )
    family, transformer_class, component_names = PIPELINE_FAMILIES[pipeline]
    components: dict[str, Any] = {}
    for component in component_names:
        if not index.get(component) or index[component][0] is None:
            raise ModelLoadError(f"model {name!r}: {index_file} names no {component}")
        library, class_name = index[component]
        if component == "transformer" and class_name == LEGACY_TRANSFORMER:
            library, class_name = "diffusers", transformer_class
        loaded = _load_component(path / component, library, class_name, dtype)
        if isinstance(loaded, torch.nn.Module):
            loaded = loaded.to(device).eval()
        components[component] = loaded
    try:
        return family(name, path, components, index)
    except ModelConfigError as exc:
        raise ModelLoadError(f"model {name!r}: {exc}") from exc
