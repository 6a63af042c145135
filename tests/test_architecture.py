"""The layout's rules, checked: who may import whom, no import cycles, and what ships in the package."""

import subprocess
import sys
import tomllib
from pathlib import Path

import grimp
import pytest
from importlinter import configuration
from importlinter.application.use_cases import lint_imports
from setuptools import find_packages

ROOT = Path(__file__).resolve().parents[1]
OUR_PACKAGES = ("app", "worker", "models", "dit_serve", "cli", "evaluation", "bench")
SHIPPED = {"app", "worker", "models", "dit_serve", "cli", "evaluation"}  # top-level packages in the wheel
HEAVY = ("torch", "diffusers", "transformers")


def test_import_contracts_hold(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    """pyproject.toml's import-linter contracts: layers, and the core and the API free of torch."""
    monkeypatch.chdir(ROOT)
    configuration.configure()  # what the lint-imports command does before it reads the contracts
    kept = lint_imports(config_filename=str(ROOT / "pyproject.toml"), no_logo=True)
    report = capsys.readouterr().out
    assert kept, report
    assert "0 broken" in report


def test_no_two_modules_import_each_other_even_indirectly() -> None:
    """Every import edge between our modules points one way (TYPE_CHECKING imports count too)."""
    graph = grimp.build_graph(*OUR_PACKAGES)
    cycles = [
        (module, imported)
        for module in sorted(graph.modules)
        for imported in graph.find_modules_directly_imported_by(module)
        if graph.chain_exists(importer=imported, imported=module)
    ]
    assert cycles == []


BLOCK_HEAVY = f"""
import importlib.abc, sys
class Block(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in {HEAVY!r}:
            raise ImportError(f"{{name}} is not installed here")
sys.meta_path.insert(0, Block())
"""


@pytest.mark.slow
def test_the_api_and_the_core_import_and_build_without_torch(tmp_path: Path) -> None:
    """An API host needs no torch: every core module and the whole API import, and the app builds."""
    core = sorted(path.stem for path in (ROOT / "dit_serve").glob("*.py") if path.stem != "__init__")
    script = (
        BLOCK_HEAVY
        + f"""
import importlib
for name in {core!r}:
    importlib.import_module("dit_serve." + name)
from app.main import create_app
from dit_serve.config import Settings
app = create_app(Settings(redis_url="redis://127.0.0.1:1/0", output_dir={str(tmp_path)!r}))
assert "/v1/images" in app.openapi()["paths"]
loaded = sorted(m for m in sys.modules if m.split(".")[0] in {HEAVY!r})
print("heavy modules loaded:", loaded)
assert not loaded
"""
    )
    result = subprocess.run(
        [sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stderr[-3000:]


CLIENT_FREE_OF = (*HEAVY, "fastapi", "starlette", "uvicorn", "rq", "boto3")


def test_the_client_imports_and_runs_without_the_server_stack() -> None:
    """dit_serve.client works on a machine with none of torch, the web stack, RQ or boto3 installed."""
    script = (
        BLOCK_HEAVY.replace(repr(HEAVY), repr(CLIENT_FREE_OF))
        + """
from dit_serve.client import AsyncClient, Client, build_submission
with Client("http://127.0.0.1:1") as client:
    assert client.settings.base_url == "http://127.0.0.1:1"
AsyncClient("http://127.0.0.1:1")
assert build_submission("image", "red circle", n=2).n == 2
"""
    )
    result = subprocess.run(
        [sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stderr[-3000:]


def test_tests_and_benchmarks_do_not_ship_in_the_package() -> None:
    """The wheel's packages are the product's; test builders and benchmark tools stay out of it."""
    find = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"]["find"]
    shipped = {name.split(".")[0] for name in find_packages(str(ROOT), include=find["include"])}
    assert shipped == SHIPPED
    builders = [path for path in ROOT.glob("**/tiny*.py") if ".venv" not in path.parts]
    assert builders and all(path.parent == ROOT / "tests" for path in builders), builders
