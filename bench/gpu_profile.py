"""Where a DiT-XL/2 denoising step spends its GPU time: `python -m bench.gpu_profile` (CUDA).

Profiles a few steps of the service's sampler at one batch size (random-weight DiT-XL/2-256, bf16,
CFG on every row) in eager and compiled mode, and prints the CUDA time by kernel class (matmul,
attention, the rest) with each class's share, plus the top kernels, and the transformer forward's
share of the step. It explains bench/gpu.py's MFU.
"""

import argparse
import json
import re
from collections import defaultdict

import torch
from torch.profiler import ProfilerActivity, profile

from bench.families import CASES, _build
from dit_serve.config import CompileMode
from models.families.base import RowCondition
from worker.acceleration import accelerate
from worker.sampling import generate

CLASSES = [  # (class, kernel-name pattern), first match wins
    ("attention", re.compile(r"flash|fmha|attention|sdpa|efficient", re.I)),
    ("matmul", re.compile(r"gemm|cutlass|sm90_xmma|nvjet|cublas|matmul", re.I)),
    ("convolution", re.compile(r"conv|implicit_gemm|winograd|cudnn", re.I)),
    ("norm", re.compile(r"norm", re.I)),
    ("triton fused", re.compile(r"triton", re.I)),
]


def kernel_class(name: str) -> str:
    return next((label for label, pattern in CLASSES if pattern.search(name)), "other elementwise")


def profile_mode(mode: CompileMode, batch: int, steps: int) -> dict:
    device = torch.device("cuda")
    torch.manual_seed(0)
    model = _build(CASES["dit-xl-2-256"], device, torch.bfloat16, tiny=False)
    accelerate(model, mode)
    rows = [RowCondition(class_label=k) for k in range(batch)]
    args = (rows, list(range(batch)), [4.0] * batch)
    generate(model, *args, 3, 256, 256)  # warm-up (compile)
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        generate(model, *args, steps, 256, 256)
        torch.cuda.synchronize()
    totals: dict[str, float] = defaultdict(float)
    kernels: dict[str, float] = defaultdict(float)
    for event in prof.key_averages():
        cuda_us = getattr(event, "device_time_total", 0.0) or 0.0
        if cuda_us and event.device_type == torch.autograd.DeviceType.CUDA:
            totals[kernel_class(event.key)] += cuda_us
            kernels[event.key[:90]] += cuda_us
    all_us = sum(totals.values())
    del model
    torch.cuda.empty_cache()
    return {
        "mode": mode.value,
        "batch": batch,
        "steps": steps,
        "gpu_ms_per_step": round(all_us / 1000 / steps, 2),
        "share": {
            key: round(value / all_us, 3) for key, value in sorted(totals.items(), key=lambda kv: -kv[1])
        },
        "top_kernels_ms": {
            key: round(value / 1000, 1) for key, value in sorted(kernels.items(), key=lambda kv: -kv[1])[:12]
        },
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--modes", nargs="+", default=["none", "default"])
    args = parser.parse_args()
    print(json.dumps({"flash_sdp": torch.backends.cuda.flash_sdp_enabled()}))
    with torch.inference_mode():
        for mode in args.modes:
            print(json.dumps(profile_mode(CompileMode(mode), args.batch, args.steps), indent=1), flush=True)


if __name__ == "__main__":
    main()
