"""`python -m bench.families --tiny` runs every family's adapter through the sampler and reports sanely."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow  # trains, benchmarks or starts processes: minutes in all


def test_tiny_family_benchmark_reports_every_model_and_batch(tmp_path: Path) -> None:
    out = tmp_path / "families.json"
    command = [sys.executable, "-m", "bench.families", "--tiny", "--dtype", "fp32", "--max-steps", "2"]
    done = subprocess.run([*command, "--json", str(out)], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    rows = json.loads(out.read_text())
    assert [(row["model"], row["batch"]) for row in rows] == [
        ("dit-xl-2-256", 1),
        ("dit-xl-2-256", 16),
        ("pixart-sigma-1024", 1),
        ("pixart-sigma-1024", 4),
        ("wan2.1-1.3b-480p", 1),
        ("wan2.1-1.3b-480p", 2),
    ]
    for row in rows:
        assert row["steps_run"] == 2 and row["default_steps_computed"] is True
        assert 0 < row["step_seconds"] < row["seconds"] and row["weights_gb"] > 0
        # the default-step time extrapolates the measured step time over the remaining steps
        expected = row["seconds"] + (row["default_steps"] - 2) * row["step_seconds"]
        assert abs(row["default_steps_seconds"] - expected) < 0.02
    assert "| wan2.1-1.3b-480p | 2 | 64x48 × 5 |" in done.stdout


def test_lora_benchmark_reports_every_way_and_the_ratios(model_dirs: dict[str, Path], tmp_path: Path) -> None:
    """`dit-serve bench lora`, tiny: one step, one round, on the tiny image model."""
    out = tmp_path / "lora.json"
    command = [sys.executable, "-m", "cli", "bench", "lora", "--model-dir", str(model_dirs["img"])]
    command += ["--steps", "1", "--rounds", "1", "--rows", "8", "--adapters", "4", "--json", str(out)]
    done = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    record = json.loads(out.read_text())
    ways = ["base", "one adapter", "mixed", "separate", "base, separate"]
    assert list(record["images_per_s"]) == ways and all(v > 0 for v in record["images_per_s"].values())
    assert record["mixed_over_one"] == pytest.approx(
        record["images_per_s"]["mixed"] / record["images_per_s"]["one adapter"], abs=1e-2
    )
    assert "mixed ÷ separate" in done.stdout
