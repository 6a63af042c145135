"""Tiny random-weight text-conditioned DiT pipelines (PixArt-α/Σ, Wan 2.1), built from config, for tests.

They are laid out like the real hub repositories, down to a SentencePiece `spiece.model` tokenizer
(trained here in a fraction of a second on a generated corpus), so the tests run the same loading,
tokenising and sampling code as PixArt-alpha/PixArt-XL-2-1024-MS or Wan-AI/Wan2.1-T2V-1.3B-Diffusers,
without a download.
"""

import json
from pathlib import Path

import diffusers
import torch
from diffusers import (
    AutoencoderKLWan,
    DPMSolverMultistepScheduler,
    PixArtTransformer2DModel,
    UniPCMultistepScheduler,
    WanTransformer3DModel,
)

from bench.offline_tokenizer import VOCAB_SIZE, build_t5_tokenizer
from models.shapes_vae import IMAGE_SIZE, LATENT_CHANNELS, build_shapes_vae

TEXT_DIM = 32  # the tiny T5 encoder's d_model
INIT_STD = 0.1


def _t5_encoder(cls_name: str, seed: int) -> torch.nn.Module:
    import transformers

    config_cls = transformers.UMT5Config if cls_name == "UMT5EncoderModel" else transformers.T5Config
    config = config_cls(
        vocab_size=VOCAB_SIZE,
        d_model=TEXT_DIM,
        d_kv=8,
        d_ff=64,
        num_layers=2,
        num_heads=4,
        relative_attention_num_buckets=8,
        feed_forward_proj="gated-gelu",  # T5 v1.1 and UMT5, as PixArt and Wan use
        dropout_rate=0.0,
        pad_token_id=0,
        eos_token_id=1,
        decoder_start_token_id=0,
    )
    torch.manual_seed(seed)
    return getattr(transformers, cls_name)(config).eval()


def _randomise(module: torch.nn.Module, generator: torch.Generator) -> None:
    """Every parameter N(0, INIT_STD^2) (norm scales around 1), so zero-initialised layers have an effect."""
    with torch.no_grad():
        for name, param in module.named_parameters():
            noise = torch.randn(param.shape, generator=generator) * INIT_STD
            is_norm_scale = "norm" in name and param.dim() == 1 and name.endswith("weight")
            param.copy_(noise + 1 if is_norm_scale else noise)


def _write_index(path: Path, pipeline: str, components: dict[str, tuple[str, str]], **extra: object) -> None:
    index = {"_class_name": pipeline, "_diffusers_version": diffusers.__version__, **extra}
    index |= {name: list(value) for name, value in components.items()}
    (path / "model_index.json").write_text(json.dumps(index, indent=2))


def build_tiny_pixart_model(path: Path, sigma: bool = False, seed: int = 0) -> Path:
    """A random PixArt-α (or -Σ) pipeline at 32x32 px, in the hub repositories' layout."""
    generator = torch.Generator().manual_seed(seed)
    transformer = PixArtTransformer2DModel(
        num_attention_heads=2,
        attention_head_dim=8,
        in_channels=LATENT_CHANNELS,
        out_channels=2 * LATENT_CHANNELS,  # learned sigma, like PixArt-XL-2
        num_layers=2,
        cross_attention_dim=16,
        caption_channels=TEXT_DIM,
        sample_size=IMAGE_SIZE // 4,
        patch_size=2,
        use_additional_conditions=False,
    )
    _randomise(transformer, generator)
    vae = build_shapes_vae()
    path.mkdir(parents=True, exist_ok=True)
    transformer.save_pretrained(path / "transformer")
    vae.save_pretrained(path / "vae")
    DPMSolverMultistepScheduler().save_pretrained(path / "scheduler")
    _t5_encoder("T5EncoderModel", seed).save_pretrained(path / "text_encoder")
    build_t5_tokenizer(path / "tokenizer", seed)
    # PixArt-α's repositories still name the transformer with the legacy class Transformer2DModel.
    transformer_class = "PixArtTransformer2DModel" if sigma else "Transformer2DModel"
    _write_index(
        path,
        "PixArtSigmaPipeline" if sigma else "PixArtAlphaPipeline",
        {
            "transformer": ("diffusers", transformer_class),
            "vae": ("diffusers", "AutoencoderKL"),
            "scheduler": ("diffusers", "DPMSolverMultistepScheduler"),
            "text_encoder": ("transformers", "T5EncoderModel"),
            "tokenizer": ("transformers", "T5Tokenizer"),
        },
    )
    return path


def build_tiny_wan_model(path: Path, seed: int = 0) -> Path:
    """A random Wan 2.1 text-to-video pipeline (sizes any multiple of 16, 1 + 4k frames)."""
    generator = torch.Generator().manual_seed(seed)
    transformer = WanTransformer3DModel(
        patch_size=(1, 2, 2),
        num_attention_heads=2,
        attention_head_dim=12,
        in_channels=16,
        out_channels=16,
        text_dim=TEXT_DIM,
        freq_dim=32,
        ffn_dim=32,
        num_layers=2,
        rope_max_seq_len=32,
    )
    _randomise(transformer, generator)
    torch.manual_seed(seed)
    vae = AutoencoderKLWan(
        base_dim=3, z_dim=16, dim_mult=[1, 1, 1, 1], num_res_blocks=1, temperal_downsample=[False, True, True]
    )
    # Wan 2.1's scheduler for 480p: UniPC on flow-matching sigmas shifted by 3.
    scheduler = UniPCMultistepScheduler(
        prediction_type="flow_prediction", use_flow_sigmas=True, flow_shift=3.0
    )
    path.mkdir(parents=True, exist_ok=True)
    transformer.save_pretrained(path / "transformer")
    vae.save_pretrained(path / "vae")
    scheduler.save_pretrained(path / "scheduler")
    _t5_encoder("UMT5EncoderModel", seed).save_pretrained(path / "text_encoder")
    build_t5_tokenizer(path / "tokenizer", seed)
    _write_index(
        path,
        "WanPipeline",
        {
            "transformer": ("diffusers", "WanTransformer3DModel"),
            "transformer_2": (None, None),
            "vae": ("diffusers", "AutoencoderKLWan"),
            "scheduler": ("diffusers", "UniPCMultistepScheduler"),
            "text_encoder": ("transformers", "UMT5EncoderModel"),
            "tokenizer": ("transformers", "T5TokenizerFast"),
        },
        boundary_ratio=None,
        expand_timesteps=False,
    )
    return path
