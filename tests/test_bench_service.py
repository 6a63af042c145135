"""`python -m bench.service`, short form: naive, ideal and the real service, one run, JSON and a plot."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

pytestmark = pytest.mark.slow  # trains, benchmarks or starts processes: minutes in all


def test_short_benchmark_reports_every_scenario(model_dirs: dict[str, Path], tmp_path: Path) -> None:
    out, plot = tmp_path / "bench.json", tmp_path / "bench.png"
    command = [sys.executable, "-m", "bench.service", "--model-dir", str(model_dirs["img"])]
    command += ["--requests", "6", "--concurrency", "1", "3", "--poisson", "0.5", "--batch", "3"]
    command += ["--steps", "3", "--max-wait-ms", "200", "--json", str(out), "--plot", str(plot)]
    done = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    results = json.loads(out.read_text())["results"]
    assert [(r["scenario"], r["parameter"]) for r in results][:4] == [
        ("naive", 1),
        ("ideal", 3),
        ("closed", 1),
        ("closed", 3),
    ]
    assert results[4]["scenario"] == "poisson"
    # the open-loop rate is half the best closed-loop throughput
    saturated = max(r["images_per_second"] for r in results if r["scenario"] == "closed")
    assert abs(results[4]["parameter"] - 0.5 * saturated) < 0.01
    for r in results:
        assert r["requests"] == 6 and r["images_per_second"] > 0
        assert 0 < r["p50_s"] <= r["p95_s"] <= r["p99_s"]
    alone, three = results[2], results[3]
    assert alone["batches"] == 6 and three["batches"] < 6  # three clients at once share batches
    assert alone["server_p50_s"] <= alone["p50_s"]  # the server's part is inside the client's latency
    with Image.open(plot) as picture:
        assert picture.size[0] > 500 and picture.size[1] > 200
    assert "| service, 3 closed-loop clients |" in done.stdout


def test_batching_comparison_alternates_modes_on_fresh_services(
    model_dirs: dict[str, Path], tmp_path: Path
) -> None:
    out = tmp_path / "batching.json"
    command = [sys.executable, "-m", "bench.compare_batching", "--model-dir", str(model_dirs["img"])]
    command += ["--requests", "4", "--rates", "8", "--repeats", "2", "--steps", "3", "--json", str(out)]
    done = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    results = json.loads(out.read_text())["results"]
    assert set(results) == {"static", "continuous"}
    for mode in results.values():
        runs = mode["8.0"]
        assert len(runs) == 2 and all(r["requests"] == 4 and r["scenario"] == "poisson" for r in runs)
    order = [json.loads(line)["batching"] for line in done.stdout.splitlines() if line.startswith("{")]
    assert order == ["static", "continuous", "continuous", "static"]  # alternating, so drift hits both
    assert "| 8 | continuous |" in done.stdout


def test_overload_benchmark_reports_each_phase(model_dirs: dict[str, Path], tmp_path: Path) -> None:
    out = tmp_path / "overload.json"
    command = [sys.executable, "-m", "bench.overload", "--model-dir", str(model_dirs["img"]), "--steps", "2"]
    command += ["--requests", "8", "--seconds", "3", "--interval", "1", "--drain", "30", "--flood", "4"]
    command += ["--max-queue-depth", "12", "--max-queued", "6", "--phases", "protected"]
    command += ["--json", str(out)]
    done = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    record = json.loads(out.read_text())
    [protected] = record["phases"]  # one phase: the idle and unprotected ones share its code
    assert record["capacity_jobs_per_s"] > 0 and record["flood_per_s"] == 4 * record["capacity_jobs_per_s"]
    assert protected["b_jobs"] == 3 and protected["b_unfinished"] == 0 and protected["server_errors"] == 0
    refused = sum(count for answer, count in protected["a_answers"].items() if answer.startswith("429"))
    assert refused > 0 and protected["a_answers"]["202"] + refused == protected["a_sent"]
    assert protected["max_queue_depth"] <= 12
    assert "| protected |" in done.stdout


def test_burst_scenario_reports_each_mode_against_ideal(model_dirs: dict[str, Path], tmp_path: Path) -> None:
    """`dit-serve bench burst`, tiny: 3 requests at once, 2 steps, one round, static under today's policy."""
    out = tmp_path / "burst.json"
    command = [sys.executable, "-m", "cli", "bench", "burst", "--model-dir", str(model_dirs["img"])]
    command += ["--burst", "3", "--rounds", "1", "--steps", "2", "--modes", "static", "--policies", "after"]
    done = subprocess.run(command + ["--json", str(out)], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]
    record = json.loads(out.read_text())
    assert record["ideal"]["scenario"] == "ideal" and record["ideal"]["parameter"] == 3
    [result] = record["results"]
    shape = (result["batching"], result["policy"], result["burst"], result["rounds"])
    assert shape == ("static", "after", 3, 1)
    assert result["images_per_second"] > 0 and result["ratio_to_ideal"] > 0
    [burst] = result["detail"]
    assert len(burst["arrivals_s"]) == len(burst["starts_s"]) == 3
    assert 1 <= result["runs"][0] <= result["takes"][0] <= 3
    assert "| static | after |" in done.stdout


def test_mixed_scenario_reports_images_alone_and_with_videos(
    model_dirs: dict[str, Path], tmp_path: Path
) -> None:
    """`dit-serve bench mixed`, tiny: 2 steps, 2 s a phase; seed 0's arrivals at these rates are 2 images
    (both phases) and 1 video (phase B)."""
    out = tmp_path / "mixed.json"
    command = [sys.executable, "-m", "cli", "bench", "mixed", "--steps", "2", "--seconds", "2"]
    command += ["--model-dir", str(model_dirs["img"]), "--video-model-dir", str(model_dirs["vid"])]
    command += ["--image-rate", "1.5", "--video-rate", "2", "--seed", "0", "--json", str(out)]
    done = subprocess.run(command, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]
    record = json.loads(out.read_text())
    assert record["capacity_images_per_s"] is None and record["image_rate"] == 1.5
    assert record["videos_expected"] == 4.0 and record["interleave"] == "on"
    alone, mixed = record["phases"]
    assert (alone["phase"], alone["images"], alone["videos"]) == ("A", 2, 0)
    assert (mixed["phase"], mixed["images"], mixed["videos"]) == ("B", 2, 1)
    assert alone["video_p99_s"] is None and mixed["video_p99_s"] > 0 and mixed["video_batches"] == 1
    for phase in (alone, mixed):
        assert 0 < phase["image_p50_s"] <= phase["image_p95_s"] <= phase["image_p99_s"]
        assert 0 <= phase["image_wait_p99_s"] < phase["image_p99_s"] and 1 <= phase["image_batches"] <= 2
    assert record["image_p99_ratio"] == pytest.approx(mixed["image_p99_s"] / alone["image_p99_s"], abs=1e-3)
    assert record["goal_met"] == (record["image_p99_ratio"] <= 2)
    assert "| B: images + videos | 2 |" in done.stdout
