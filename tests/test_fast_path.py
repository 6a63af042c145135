"""The GPU fast path's flags change speed, not outputs, and run on the CPU; bench/gpu.sh has a tiny mode."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from dit_serve.config import CompileMode
from dit_serve.lora_registry import store_adapter
from dit_serve.loras import AppliedLora, read_adapter
from dit_serve.storage import LocalStorage
from models.loading import RowCondition, load_model
from tests.test_lora import write_adapter
from worker.acceleration import GraphStep, accelerate, repeated_blocks
from worker.lora import adaptable_layers, adapter_bank, row_adapters
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
def test_compiled_model_gives_the_eager_output_with_and_without_adapters(
    mode: CompileMode, model_dirs: dict[str, Path], tmp_path: Path
) -> None:
    """Inductor on the CPU (C++ kernels); the CUDA-graph mode falls back to plain compiled code there.
    LoRA adapters loaded after the first compiled call (as a worker loads them on first use) go into
    the transformer's own layers, and the compiled model runs them: its mixed rows equal eager ones."""
    model = load_model("img", model_dirs["img"], CPU)
    reference = load_model("img", model_dirs["img"], CPU)
    rows, seeds, scales = [RowCondition(class_label=3), RowCondition(class_label=9)], [1, 2], [4.0, 1.0]
    eager, _ = generate(model, rows, seeds, scales, 4, 32, 32)
    compiled_blocks = accelerate(model, mode)
    assert compiled_blocks == (1 if mode is CompileMode.REDUCE_OVERHEAD else 2)
    if mode is CompileMode.REDUCE_OVERHEAD:
        assert isinstance(model.transformer, GraphStep) and model.latent_channels == 4
    fast, _ = generate(model, rows, seeds, scales, 4, 32, 32)
    assert (fast.int() - eager.int()).abs().max() <= 1

    # the compiled transformer offers the same layers to adapters as the eager one
    assert adaptable_layers(model.transformer) == adaptable_layers(reference.transformer)
    storage = LocalStorage(tmp_path / "storage")
    write_adapter(tmp_path / "red", reference.transformer, seed=1)
    info = store_adapter(storage, "img", "red", read_adapter(tmp_path / "red"), str(tmp_path / "red"))
    loras = [(AppliedLora.of(info, 1.0),), ()]
    mixed = {
        name: generate(
            m,
            rows,
            seeds,
            scales,
            4,
            32,
            32,
            adapters=row_adapters(adapter_bank(m.transformer, storage), loras),
        )[0].int()
        for name, m in (("eager", reference), ("compiled", model))
    }
    assert (mixed["compiled"] - mixed["eager"]).abs().max() <= 1
    assert (mixed["compiled"][0] - fast[0]).abs().max() > 20  # the adapter ran in the compiled model
    assert (mixed["compiled"][1] - fast[1]).abs().max() <= 1  # and only on its row


@pytest.mark.slow
def test_gpu_bench_script_runs_every_stage_in_tiny_mode_on_the_cpu(tmp_path: Path) -> None:
    """bench/gpu.sh's one GPU run, with a 2-layer DiT and a tiny workload: every stage reports."""
    done = subprocess.run(
        ["bash", str(ROOT / "bench" / "gpu.sh"), "--tiny", "--device", "cpu", "--dtype", "fp32"],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "OUT": str(tmp_path), "PYTHON": sys.executable},
    )
    assert done.returncode == 0, done.stderr[-2000:]
    record = json.loads((tmp_path / "gpu-service.json").read_text())
    stages = record["stages"]
    assert list(stages) == ["model", "sampler", "service_static", "service_continuous"]
    assert not [name for name, stage in stages.items() if "error" in stage or "skipped" in stage]
    assert stages["model"]["cache_auto"] == {"policy": "interval", "interval": 2, "warmup": 0.1}
    sampler = stages["sampler"]
    assert (sampler["service_shape_row"]["batch"], sampler["mfu_row"]["batch"]) == (4, 32)
    assert sampler["mfu_row"]["mfu"] is None  # no peak is known for a CPU
    static, continuous = stages["service_static"], stages["service_continuous"]
    assert static["closed"]["requests"] == 4 and static["closed"]["parameter"] == 4  # 4 clients
    # cache: "auto" resolved to the model directory's policy, with its defaults filled in
    assert static["closed_cache_auto"]["policy"]["policy"] == "interval"
    assert static["closed_cache_auto"]["policy"]["interval"] == 2
    for stage in (static, continuous):
        assert [(row["load"], row["requests"]) for row in stage["poisson"]] == [(0.5, 3), (0.9, 3)]
    capacity = static["closed"]["images_per_second"]
    assert continuous["capacity_images_per_second"] == capacity
    assert continuous["poisson"][1]["parameter"] == round(0.9 * capacity, 3)
    summary = record["summary"]
    expected_ratio = capacity / sampler["service_shape_row"]["images_per_second"]
    assert summary["service_over_sampler"] == pytest.approx(expected_ratio, abs=1e-3)
    assert summary["cache_auto_speedup"] > 0 and summary["mfu_batch_32_whole_transformer_compiled"] is None
    assert set(summary["p99_s_static"]) == set(summary["p99_s_continuous"]) == {"0.5", "0.9"}
    assert {"api.log", "worker.log"} <= {
        log.name.split("-", 1)[1] for log in (tmp_path / "gpu-service-logs").iterdir()
    }
