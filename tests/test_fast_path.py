"""The GPU fast path's flags change speed, not outputs, and run on the CPU; bench/gpu.sh has a tiny mode."""

import json
import os
import subprocess
from pathlib import Path

import pytest
import torch

from dit_serve.config import CompileMode
from models.loading import RowCondition, load_model
from worker.acceleration import GraphStep, accelerate, repeated_blocks
from worker.sampling import generate

CPU = torch.device("cpu")
ROOT = Path(__file__).resolve().parents[1]


def test_repeated_blocks_finds_each_familys_layer_stack(model_dirs: dict[str, Path]) -> None:
    for key, block in (
        ("img", "BasicTransformerBlock"),
        ("pixart-alpha", "BasicTransformerBlock"),
        ("wan", "WanTransformerBlock"),
    ):
        blocks = repeated_blocks(load_model(key, model_dirs[key], CPU).transformer)
        assert len(blocks) == 2 and {type(b).__name__ for b in blocks} == {block}


@pytest.mark.parametrize("mode", [CompileMode.DEFAULT, CompileMode.REDUCE_OVERHEAD])
@pytest.mark.slow
def test_compiled_model_gives_the_eager_output(mode: CompileMode, model_dirs: dict[str, Path]) -> None:
    """Inductor on the CPU (C++ kernels); the CUDA-graph mode falls back to plain compiled code there."""
    model = load_model("img", model_dirs["img"], CPU)
    rows, seeds, scales = [RowCondition(class_label=3), RowCondition(class_label=9)], [1, 2], [4.0, 1.0]
    eager, _ = generate(model, rows, seeds, scales, 4, 32, 32)
    compiled_blocks = accelerate(model, mode)
    assert compiled_blocks == (1 if mode is CompileMode.REDUCE_OVERHEAD else 2)
    if mode is CompileMode.REDUCE_OVERHEAD:
        assert isinstance(model.transformer, GraphStep) and model.latent_channels == 4
    fast, _ = generate(model, rows, seeds, scales, 4, 32, 32)
    assert (fast.int() - eager.int()).abs().max() <= 1


@pytest.mark.slow
def test_gpu_bench_script_runs_in_tiny_mode_on_the_cpu(tmp_path: Path) -> None:
    flags = [
        "--tiny",
        "--device",
        "cpu",
        "--dtype",
        "fp32",
        "--steps",
        "2",
        "--batches",
        "1",
        "2",
        "--modes",
        "none",
    ]
    done = subprocess.run(
        ["bash", str(ROOT / "bench" / "gpu.sh"), *flags],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "OUT": str(tmp_path)},
    )
    assert done.returncode == 0, done.stderr[-2000:]
    rows = json.loads((tmp_path / "gpu.json").read_text())
    assert [(r["mode"], r["batch"], r["steps"]) for r in rows] == [("none", 1, 2), ("none", 2, 2)]
    assert all(r["mfu"] is None and r["images_per_second"] > 0 for r in rows)  # no peak known for a CPU
    assert "| none | 2 |" in done.stdout
