"""DiT-XL/2 at 256² on one GPU: images/s and model FLOP utilisation, eager and compiled.

`python -m bench.gpu --device cuda --dtype bf16` runs it on an H100 or H200; bench/gpu_service.py reuses
its timing in `bench/gpu.sh`'s run of the whole service. The model is built from DiT-XL/2-256's config
with random weights (FLOPs, not weight values, decide speed) and sampled by the service's own sampler,
`worker.sampling.generate` (CFG in one forward pass, DDIM, VAE decode), with the worker's fast path
(`worker.acceleration.accelerate`) in each compile mode.

MFU counts the model's FLOPs: one DiT-XL/2 forward at 256² is 118.6 GMAC = 237.2 GFLOP per image, CFG
doubles the rows, and the SD VAE decoder adds 311 GMAC per image; divided by the card's dense bf16
peak (989.4 TFLOP/s for H100 SXM and H200).
"""

import argparse
import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from bench.families import CASES, TINY_SIZES, _build
from dit_serve.config import CompileMode
from models.families.base import RowCondition
from worker.acceleration import accelerate
from worker.sampling import generate

DIT_XL_2_256_FORWARD_FLOP = 2 * 118.6e9  # per image per forward pass
SD_VAE_DECODE_256_FLOP = 2 * 311e9  # per image
PEAK_BF16_FLOPS = {"H100": 989.4e12, "H200": 989.4e12}  # dense, SXM
GUIDANCE = 4.0
WARM_UP_STEPS = 3  # enough for compile and CUDA-graph recording, which do not depend on the step count


@dataclass
class Row:
    mode: str
    batch: int
    steps: int
    device: str
    seconds: float  # one batch, all steps + decode
    images_per_second: float
    mfu: float | None  # None where the card's peak is unknown (CPU)
    warm_up_seconds: float  # first call at this batch size: compile and graph capture land here
    max_abs_diff_vs_eager: int | None  # 8-bit pixels, same seeds


def flop_per_image(steps: int) -> float:
    return steps * 2 * DIT_XL_2_256_FORWARD_FLOP + SD_VAE_DECODE_256_FLOP


def peak_flops(device: torch.device) -> float | None:
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((peak for card, peak in PEAK_BF16_FLOPS.items() if card in name), None)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def run_mode(
    mode: CompileMode,
    batches: list[int],
    steps: int,
    device: torch.device,
    dtype: torch.dtype,
    tiny: bool,
    reference: dict[int, torch.Tensor],
) -> list[Row]:
    """Every batch size in one compile mode, on a freshly built model."""
    torch.manual_seed(0)
    case = CASES["dit-xl-2-256"]
    model = _build(case, device, dtype, tiny)
    accelerate(model, mode)
    size, rows = TINY_SIZES[case.name][0] if tiny else case.width, []
    for batch in batches:
        conditions = [RowCondition(class_label=k % 1000) for k in range(batch)]
        seeds, scales = list(range(batch)), [GUIDANCE] * batch
        start = time.perf_counter()
        generate(model, conditions, seeds, scales, WARM_UP_STEPS, size, size)
        _sync(device)
        warm_up = time.perf_counter() - start
        start = time.perf_counter()
        pixels, _ = generate(model, conditions, seeds, scales, steps, size, size)
        _sync(device)
        seconds = time.perf_counter() - start
        diff = None
        if batch in reference:
            diff = int((pixels.int() - reference[batch].int()).abs().max())
        else:
            reference[batch] = pixels
        peak = peak_flops(device)
        row = Row(
            mode=mode.value,
            batch=batch,
            steps=steps,
            device=torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
            seconds=round(seconds, 4),
            images_per_second=round(batch / seconds, 3),
            mfu=round(batch * flop_per_image(steps) / seconds / peak, 4) if peak else None,
            warm_up_seconds=round(warm_up, 2),
            max_abs_diff_vs_eager=diff,
        )
        rows.append(row)
        print(json.dumps(asdict(row)), flush=True)
    del model
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return rows


def format_table(rows: list[Row]) -> str:
    lines = [
        "| mode | batch | s per batch | images/s | MFU | first call s | max diff vs eager |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        mfu = "n/a" if r.mfu is None else f"{100 * r.mfu:.1f}%"
        diff = "—" if r.max_abs_diff_vs_eager is None else f"{r.max_abs_diff_vs_eager}/255"
        cells = [r.mode, r.batch, r.seconds, r.images_per_second, mfu, r.warm_up_seconds, diff]
        lines.append("| " + " | ".join(str(cell) for cell in cells) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default="bf16", choices=["bf16", "fp16", "fp32"])
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 8, 16, 32, 64])
    parser.add_argument(
        "--modes", nargs="+", default=["none", "default"], choices=[m.value for m in CompileMode]
    )
    parser.add_argument("--tiny", action="store_true", help="a 2-layer DiT of the same code (CPU tests)")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[args.dtype]
    rows: list[Row] = []
    reference: dict[int, torch.Tensor] = {}
    with torch.inference_mode():
        for mode in args.modes:
            try:
                rows += run_mode(
                    CompileMode(mode), args.batches, args.steps, device, dtype, args.tiny, reference
                )
            except Exception as exc:  # one failing mode must not lose the others' numbers
                print(json.dumps({"mode": mode, "error": f"{type(exc).__name__}: {exc}"[:2000]}), flush=True)
            if args.json:
                args.json.write_text(json.dumps([asdict(row) for row in rows], indent=2))
    print(format_table(rows))
    by_batch = {(r.mode, r.batch): r.images_per_second for r in rows}
    for mode in args.modes:
        if (mode, 1) in by_batch and (mode, 16) in by_batch:
            print(
                f"{mode}: images/s at batch 16 = {by_batch[(mode, 16)] / by_batch[(mode, 1)]:.2f} x batch 1"
            )


if __name__ == "__main__":
    main()
