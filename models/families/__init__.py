"""The DiT families the service can drive, by the pipeline class a checkpoint's model_index.json names."""

from models.families.base import LoadedModel
from models.families.class_dit import ClassConditionalDiT
from models.families.pixart import PixArt
from models.families.wan import Wan

# pipeline class -> (adapter, the class to load a legacy "Transformer2DModel" transformer as, components)
KL_COMPONENTS = ("transformer", "vae", "scheduler")
TEXT_COMPONENTS = (*KL_COMPONENTS, "text_encoder", "tokenizer")
PIPELINE_FAMILIES: dict[str, tuple[type[LoadedModel], str, tuple[str, ...]]] = {
    "DiTPipeline": (ClassConditionalDiT, "DiTTransformer2DModel", KL_COMPONENTS),
    "SpaceTimeDiTPipeline": (ClassConditionalDiT, "SpaceTimeDiTModel", KL_COMPONENTS),
    "PixArtAlphaPipeline": (PixArt, "PixArtTransformer2DModel", TEXT_COMPONENTS),
    "PixArtSigmaPipeline": (PixArt, "PixArtTransformer2DModel", TEXT_COMPONENTS),
    "WanPipeline": (Wan, "WanTransformer3DModel", TEXT_COMPONENTS),
}
