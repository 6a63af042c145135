"""--model NAME=SOURCE: directories, hub ids from the local hub cache, and a clear, fast failure offline."""

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from dit_serve.config import get_settings
from dit_serve.embedded_redis import free_port
from models.loading import ModelLoadError
from models.sources import is_hub_id, resolve_source
from worker.main import load_models

REPO_ID = "dit-serve-tests/tiny-dit"
COMMIT = "0123456789abcdef0123456789abcdef01234567"


def _offline_env(tmp_path: Path, **extra: str) -> dict[str, str]:
    """A hub that cannot be reached (a closed local port) and an empty cache of our own."""
    env = dict(os.environ)
    env.update(HF_HUB_CACHE=str(tmp_path / "hub"), HF_ENDPOINT=f"http://127.0.0.1:{free_port()}", **extra)
    env.pop("HF_HUB_OFFLINE", None)
    return env


def test_hub_ids_and_paths_are_told_apart() -> None:
    assert is_hub_id("facebook/DiT-XL-2-256") and is_hub_id("PixArt-alpha/PixArt-XL-2-512x512")
    assert not any(map(is_hub_id, ["./models/x", "/models/x", "x", "a/b/c", "../a"]))


def test_a_directory_is_used_as_it_is(model_dirs: dict[str, Path]) -> None:
    assert resolve_source("tiny", str(model_dirs["img"])) == model_dirs["img"]


def test_a_missing_path_that_is_no_hub_id_names_the_model(tmp_path: Path) -> None:
    with pytest.raises(ModelLoadError, match=r"model 'mine': .*nope.* is not a directory"):
        resolve_source("mine", str(tmp_path / "nope"))


@pytest.mark.slow
def test_an_unreachable_hub_fails_the_worker_fast_and_clearly(tmp_path: Path, redis_url: str) -> None:
    """No network: the worker exits at once, naming the model and what to run, without a traceback."""
    result = subprocess.run(
        [sys.executable, "-m", "cli", "worker", "--redis-url", redis_url, "--device", "cpu",
         "--output-dir", str(tmp_path / "out"), "--model", "xl=facebook/DiT-XL-2-256"],
        env=_offline_env(tmp_path), capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert result.returncode != 0
    assert "model 'xl'" in result.stderr and "hf download facebook/DiT-XL-2-256" in result.stderr
    assert "Traceback" not in result.stderr, result.stderr


@pytest.mark.slow
def test_a_cached_hub_id_loads_without_network(model_dirs: dict[str, Path], tmp_path: Path) -> None:
    """A cached snapshot (the hub cache's own layout) is found offline and loads as a model."""
    repo = tmp_path / "hub" / f"models--{REPO_ID.replace('/', '--')}"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(COMMIT)
    shutil.copytree(model_dirs["img"], repo / "snapshots" / COMMIT)
    script = (
        "import torch; from models.sources import resolve_source; from models.loading import load_model; "
        f"path = resolve_source('cached', {REPO_ID!r}); "
        "model = load_model('cached', path, torch.device('cpu')); print(path); print(model.kind)"
    )
    env = _offline_env(tmp_path)
    command = [sys.executable, "-c", script]
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines() == [str(repo / "snapshots" / COMMIT), "image"]


def test_dtype_applies_to_every_model(model_dirs: dict[str, Path]) -> None:
    settings = get_settings(models=[f"a={model_dirs['img']}", f"b={model_dirs['vid']}"], dtype="bf16")
    models = load_models(settings, torch.device("cpu"))
    assert sorted(models) == ["a", "b"]
    assert all(m.transformer.dtype == m.vae.dtype == torch.bfloat16 for m in models.values())
