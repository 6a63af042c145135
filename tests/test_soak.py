"""`dit-serve soak --minutes 2`: kills, a Redis and an API restart under load, and nothing lost."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow


def test_a_two_minute_soak_loses_nothing(model_dirs: dict[str, Path], tmp_path: Path) -> None:
    out = tmp_path / "soak.json"
    command = [sys.executable, "-m", "cli", "soak", "--minutes", "2", "--rate", "2", "--kill-every", "20"]
    command += ["--steps", "4", "--model-dir", str(model_dirs["img"]), "--drain", "120", "--json", str(out)]
    done = subprocess.run(command, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    report = json.loads(out.read_text())
    assert report["worker_kills"] >= 4 and report["redis_restarts"] == 1 and report["api_restarts"] == 1
    assert report["accepted"] >= 150 and report["lost"] == 0 and report["lost_ids"] == []
    assert report["completed"] + report["canceled"] + sum(report["failed"].values()) == report["accepted"]
    assert report["duplicate_outputs"] == 0 and report["duplicate_posts_split"] == 0
    assert report["duplicate_posts_consistent"] > 0 and report["refused"] == 0
    assert report["server_errors"] == 0
    assert "| lost (404 or never final) | 0 |" in done.stdout
