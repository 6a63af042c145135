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
