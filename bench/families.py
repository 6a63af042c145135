"""Memory and speed of each served family's real architecture on one device: `python -m bench.families`.

Builds facebook/DiT-XL-2-256, PixArt-Σ-XL-2-1024-MS and Wan2.1-T2V-1.3B from their published configs
with random weights (FLOPs and bytes decide speed and memory, not the weights' values), wraps each in
the service's own family adapter and times the service's sampler, `worker.sampling.generate`, which
is what a worker runs for a batch: text encoding, the CFG denoising loop, VAE decode.

Reported per model and batch size: resident weights, peak memory, seconds per batch (text encoding +
steps + decode), seconds per denoising step, decode seconds. A run with fewer steps than the model's
default (Wan, to fit a short device lease) also reports the default-step time computed from the
measured per-step time, marked as computed. `--tiny` runs small configs of the same code on the CPU.
"""

import argparse
import json
import statistics
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from diffusers import (
    AutoencoderKL,
    AutoencoderKLWan,
    DDIMScheduler,
    DiTTransformer2DModel,
    DPMSolverMultistepScheduler,
    PixArtTransformer2DModel,
    UniPCMultistepScheduler,
    WanTransformer3DModel,
)
from diffusers.models.modeling_utils import ModelMixin

from bench.offline_tokenizer import build_t5_tokenizer
from models.families.base import LoadedModel, RowCondition
from models.families.class_dit import ClassConditionalDiT
from models.families.pixart import PixArt
from models.families.wan import Wan
from worker.sampling import generate

GB = 1024**3
PROMPT = "a photo of a red fox under the sky"
SD_VAE = {  # the Stable Diffusion VAE layout, shared by DiT (sd-vae-ft-ema) and PixArt-Σ (SDXL VAE)
    "down_block_types": ["DownEncoderBlock2D"] * 4,
    "up_block_types": ["UpDecoderBlock2D"] * 4,
    "block_out_channels": [128, 256, 512, 512],
    "layers_per_block": 2,
    "latent_channels": 4,
}
T5_XXL = {"d_model": 4096, "d_kv": 64, "d_ff": 10240, "num_layers": 24, "num_heads": 64}
T5_VOCAB, UMT5_VOCAB = 32128, 256384
# The tiny DiT's latent side: 32x32 images, so a CPU run's VAE decode takes milliseconds, not seconds.
TINY_DIT_LATENT = 4


@dataclass(frozen=True)
class Case:
    """One architecture at one setting: what a request to it looks like."""

    name: str
    build: Callable[[bool], tuple[type[LoadedModel], dict[str, Any], dict[str, Any]]]
    width: int
    height: int
    frames: int
    steps: int  # the model's default steps
    guidance: float
    batches: tuple[int, ...]


@dataclass
class Result:
    model: str
    device: str
    dtype: str
    batch: int
    size: str
    frames: int
    steps_run: int
    default_steps: int
    weights_gb: float
    peak_gb: float | None  # CUDA only
    seconds: float  # one batch, steps_run steps
    step_seconds: float
    decode_seconds: float
    default_steps_seconds: float  # measured if steps_run == default_steps, else computed
    default_steps_computed: bool
    outputs_per_second: float


def _t5(vocab: int, umt5: bool, tiny: bool) -> torch.nn.Module:
    import transformers

    sizes = {"d_model": 32, "d_kv": 8, "d_ff": 64, "num_layers": 2, "num_heads": 4} if tiny else T5_XXL
    config_cls = transformers.UMT5Config if umt5 else transformers.T5Config
    config = config_cls(vocab_size=vocab, feed_forward_proj="gated-gelu", dropout_rate=0.0, **sizes)
    model_cls = transformers.UMT5EncoderModel if umt5 else transformers.T5EncoderModel
    return model_cls(config)


def _tokenizer() -> Any:
    from transformers import T5Tokenizer

    return T5Tokenizer.from_pretrained(build_t5_tokenizer(Path(tempfile.mkdtemp()) / "tokenizer"))


def _dit_xl_2_256(tiny: bool) -> tuple[type[LoadedModel], dict[str, Any], dict[str, Any]]:
    layers, heads = (2, 2) if tiny else (28, 16)
    transformer = DiTTransformer2DModel(
        num_attention_heads=heads,
        attention_head_dim=72,
        in_channels=4,
        out_channels=8,
        num_layers=layers,
        sample_size=TINY_DIT_LATENT if tiny else 32,
        patch_size=2,
        num_embeds_ada_norm=1000,
    )
    vae = AutoencoderKL(**(SD_VAE | ({"block_out_channels": [32, 32, 32, 32]} if tiny else {})))
    labels = {str(i): f"class {i}" for i in range(1000)}
    components = {"transformer": transformer, "vae": vae, "scheduler": DDIMScheduler()}
    return ClassConditionalDiT, components, {"_class_name": "DiTPipeline", "id2label": labels}


def _pixart_sigma_1024(tiny: bool) -> tuple[type[LoadedModel], dict[str, Any], dict[str, Any]]:
    layers, heads = (2, 2) if tiny else (28, 16)
    transformer = PixArtTransformer2DModel(
        num_attention_heads=heads,
        attention_head_dim=72,
        in_channels=4,
        out_channels=8,
        num_layers=layers,
        cross_attention_dim=heads * 72,
        caption_channels=32 if tiny else 4096,
        sample_size=16 if tiny else 128,
        patch_size=2,
        interpolation_scale=2,
        use_additional_conditions=False,
    )
    vae = AutoencoderKL(**(SD_VAE | ({"block_out_channels": [32, 32, 32, 32]} if tiny else {})))
    components = {
        "transformer": transformer,
        "vae": vae,
        "scheduler": DPMSolverMultistepScheduler(),
        "text_encoder": _t5(T5_VOCAB, umt5=False, tiny=tiny),
        "tokenizer": _tokenizer(),
    }
    return PixArt, components, {"_class_name": "PixArtSigmaPipeline"}


def _wan_2_1_1_3b(tiny: bool) -> tuple[type[LoadedModel], dict[str, Any], dict[str, Any]]:
    layers, heads = (2, 2) if tiny else (30, 12)
    transformer = WanTransformer3DModel(
        patch_size=(1, 2, 2),
        num_attention_heads=heads,
        attention_head_dim=128,
        in_channels=16,
        out_channels=16,
        text_dim=32 if tiny else 4096,
        freq_dim=256,
        ffn_dim=64 if tiny else 8960,
        num_layers=layers,
        cross_attn_norm=True,
        qk_norm="rms_norm_across_heads",
    )
    vae = AutoencoderKLWan(base_dim=8) if tiny else AutoencoderKLWan()
    components = {
        "transformer": transformer,
        "vae": vae,
        "scheduler": UniPCMultistepScheduler(
            prediction_type="flow_prediction", use_flow_sigmas=True, flow_shift=3.0
        ),
        "text_encoder": _t5(UMT5_VOCAB, umt5=True, tiny=tiny),
        "tokenizer": _tokenizer(),
    }
    return Wan, components, {"_class_name": "WanPipeline"}


CASES = {
    "dit-xl-2-256": Case("dit-xl-2-256", _dit_xl_2_256, 256, 256, 1, 25, 4.0, (1, 16)),
    "pixart-sigma-1024": Case("pixart-sigma-1024", _pixart_sigma_1024, 1024, 1024, 1, 20, 4.5, (1, 4)),
    "wan2.1-1.3b-480p": Case("wan2.1-1.3b-480p", _wan_2_1_1_3b, 832, 480, 81, 50, 5.0, (1, 2)),
}
TINY_SIZES = {
    "dit-xl-2-256": (8 * TINY_DIT_LATENT, 8 * TINY_DIT_LATENT, 1),
    "pixart-sigma-1024": (128, 128, 1),
    "wan2.1-1.3b-480p": (64, 48, 5),
}


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _cast(module: torch.nn.Module, dtype: torch.dtype) -> torch.nn.Module:
    """Cast as diffusers' from_pretrained(torch_dtype=...) does: modules it keeps in fp32 stay fp32."""
    module.to(dtype)
    keep = getattr(module, "_keep_in_fp32_modules", None) if isinstance(module, ModelMixin) else None
    for name, child in module.named_modules():
        if keep and any(part in name.split(".") for part in keep):
            child.to(torch.float32)
    return module


def _build(case: Case, device: torch.device, dtype: torch.dtype, tiny: bool) -> LoadedModel:
    with torch.device(device):
        family, components, index = case.build(tiny)
    for key, part in components.items():
        if isinstance(part, torch.nn.Module):
            components[key] = _cast(part, dtype).eval()
    return family(case.name, Path(case.name), components, index)


def run_case(
    case: Case, device: torch.device, dtype: torch.dtype, tiny: bool, max_steps: int | None
) -> list[Result]:
    model = _build(case, device, dtype, tiny)
    modules = [model.transformer, model.vae, getattr(model, "text_encoder", None)]
    tensors = [t for m in modules if m is not None for t in [*m.parameters(), *m.buffers()]]
    weights = sum(t.numel() * t.element_size() for t in tensors) / GB
    width, height, frames = TINY_SIZES[case.name] if tiny else (case.width, case.height, case.frames)
    steps = min(case.steps, max_steps) if max_steps else case.steps
    results = []
    for batch in case.batches:
        rows = [RowCondition(class_label=7)] * batch
        if model.conditioning == "text":
            rows = [RowCondition(prompt=f"{PROMPT} {k}") for k in range(batch)]
        seeds, scales = list(range(batch)), [case.guidance] * batch
        generate(model, rows[:1], seeds[:1], scales[:1], 1, width, height, frames)  # warm-up
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        marks: list[float] = []

        def on_step(done: int, total: int, live: torch.Tensor, marks: list[float] = marks) -> None:
            _sync(device)
            marks.append(time.perf_counter())

        start = time.perf_counter()
        generate(model, rows, seeds, scales, steps, width, height, frames, on_step=on_step)
        _sync(device)
        end = time.perf_counter()
        step_times = [b - a for a, b in zip(marks, marks[1:], strict=False)] or [marks[0] - start]
        step = statistics.median(step_times)
        seconds = end - start
        full = seconds + (case.steps - steps) * step
        peak = torch.cuda.max_memory_allocated(device) / GB if device.type == "cuda" else None
        results.append(
            Result(
                model=case.name,
                device=torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
                dtype=str(dtype).removeprefix("torch."),
                batch=batch,
                size=f"{width}x{height}",
                frames=frames,
                steps_run=steps,
                default_steps=case.steps,
                weights_gb=round(weights, 2),
                peak_gb=None if peak is None else round(peak, 2),
                seconds=round(seconds, 3),
                step_seconds=round(step, 4),
                decode_seconds=round(end - marks[-1], 3),
                default_steps_seconds=round(full, 2),
                default_steps_computed=steps != case.steps,
                outputs_per_second=round(batch / full, 3),
            )
        )
        print(json.dumps(asdict(results[-1])), flush=True)
    del model
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return results


def format_table(results: list[Result]) -> str:
    lines = [
        "| model | batch | size × frames | weights GB | peak GB | s/step | decode s "
        "| s per batch, default steps |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        computed = " (computed)" if r.default_steps_computed else ""
        lines.append(
            f"| {r.model} | {r.batch} | {r.size} × {r.frames} | {r.weights_gb} | {r.peak_gb} | "
            f"{r.step_seconds} | {r.decode_seconds} | {r.default_steps_seconds} at {r.default_steps}"
            f"{computed} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default="bf16", choices=["bf16", "fp16", "fp32"])
    parser.add_argument("--models", nargs="*", default=list(CASES), choices=list(CASES))
    parser.add_argument("--max-steps", type=int, default=None, help="run at most this many steps")
    parser.add_argument("--tiny", action="store_true", help="small configs of the same code (CPU tests)")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args(argv)
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[args.dtype]
    device = torch.device(args.device)
    with torch.inference_mode():
        results = [
            r for name in args.models for r in run_case(CASES[name], device, dtype, args.tiny, args.max_steps)
        ]
    print(format_table(results))
    if args.json:
        args.json.write_text(json.dumps([asdict(r) for r in results], indent=2))


if __name__ == "__main__":
    main()
