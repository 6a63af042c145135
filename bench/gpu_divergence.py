"""How far apart bf16 eager, bf16 compiled and fp32 outputs of random-weight DiT-XL/2 drift.

`python -m bench.gpu_divergence` (CUDA). bench/gpu.py reports each compiled output's distance from
the eager one; with random weights that distance grows over 50 steps whatever the kernels, because
the random model amplifies rounding. This check puts a number on the floor: eager bf16 against eager
fp32, after 1 and after 50 steps, next to compiled bf16 against both.
"""

import json

import torch

from bench.families import CASES, _build
from dit_serve.config import CompileMode
from models.families.base import RowCondition
from worker.acceleration import accelerate
from worker.sampling import generate

BATCH = 8


def _pixels(device: torch.device, dtype: torch.dtype, mode: CompileMode, steps: int) -> torch.Tensor:
    torch.manual_seed(0)
    model = _build(CASES["dit-xl-2-256"], device, dtype, tiny=False)
    accelerate(model, mode)
    rows = [RowCondition(class_label=k) for k in range(BATCH)]
    pixels, _ = generate(model, rows, list(range(BATCH)), [4.0] * BATCH, steps, 256, 256)
    del model
    torch.cuda.empty_cache()
    return pixels.int()


def main() -> None:
    device = torch.device("cuda")
    with torch.inference_mode():
        for steps in (1, 50):
            fp32 = _pixels(device, torch.float32, CompileMode.NONE, steps)
            bf16 = _pixels(device, torch.bfloat16, CompileMode.NONE, steps)
            compiled = _pixels(device, torch.bfloat16, CompileMode.DEFAULT, steps)
            report = {
                "steps": steps,
                "eager_bf16_vs_fp32": int((bf16 - fp32).abs().max()),
                "compiled_bf16_vs_eager_bf16": int((compiled - bf16).abs().max()),
                "compiled_bf16_vs_fp32": int((compiled - fp32).abs().max()),
            }
            print(json.dumps(report), flush=True)


if __name__ == "__main__":
    main()
