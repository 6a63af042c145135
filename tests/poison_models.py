"""A test-only DiT family whose transformer misbehaves on one class label, for the poison-job tests.

`PoisonDiT` is the class-conditional DiT adapter with a `predict` that, when a row of the batch asks
for the poison label, raises, ends the process (`os._exit`, as a segfault or an OOM kill would), or
hangs; and, optionally, raises a CUDA-style out-of-memory error for batches of more than a given
number of outputs. Which of these a model does is in its own `model_index.json` (`poison`), so one
tiny model directory per behaviour is built by `build_poison_model`.

Production code never sees this family: `models.families.PIPELINE_FAMILIES` knows only the real ones.
The tests start workers with `python -m tests.poison_models worker` (see POISON_WORKER), which
registers the family in that table and then runs the `dit-serve` command line unchanged. A test that
samples in its own process calls `register()`. This rather than an environment switch read by
production code, and rather than a transformer class of the tests' own in the model directory
(`models/loading.py` imports only the classes it lists, by design).
"""

import json
import os
import shutil
import sys
import time
from enum import StrEnum
from pathlib import Path
from typing import Any

import torch

from models.families import KL_COMPONENTS, PIPELINE_FAMILIES
from models.families.base import Conditioning
from models.families.class_dit import ClassConditionalDiT

POISON_PIPELINE = "PoisonDiTPipeline"
POISON_KEY = "poison"  # model_index.json: {"label": int, "action": Action, "oom_above_outputs": int}
POISON_WORKER = "tests.poison_models"  # python -m POISON_WORKER <dit-serve arguments>
POISON_EXIT_STATUS = 86
HANG_S = 3600.0
OOM_MESSAGE = "CUDA out of memory. Tried to allocate 2.00 GiB (test model: {outputs} outputs > {limit})"


class Action(StrEnum):
    RAISE = "raise"  # a bug in one request's path: RuntimeError
    EXIT = "exit"  # the process dies at once (os._exit), as on a segfault or a kill
    HANG = "hang"  # the sampler never returns


class PoisonError(RuntimeError):
    """What a poison row raises (not an out-of-memory error)."""


class PoisonDiT(ClassConditionalDiT):
    """A class-conditional DiT that misbehaves on its poison label (tests only)."""

    def __init__(self, name: str, path: Path, components: dict[str, Any], index: dict[str, Any]):
        super().__init__(name, path, components, index)
        poison = index.get(POISON_KEY) or {}
        self.poison_label: int | None = poison.get("label")
        self.action = Action(poison["action"]) if poison.get("action") else None
        self.oom_above_outputs: int | None = poison.get("oom_above_outputs")

    def predict(self, x: torch.Tensor, t: torch.Tensor, cond: Conditioning) -> torch.Tensor:
        labels = cond["class_labels"]
        outputs = labels[labels != self.null_class_id].tolist()  # the CFG batch's conditional rows
        if self.oom_above_outputs is not None and len(outputs) > self.oom_above_outputs:
            raise RuntimeError(OOM_MESSAGE.format(outputs=len(outputs), limit=self.oom_above_outputs))
        if self.poison_label in outputs:
            if self.action is Action.RAISE:
                raise PoisonError(f"poison label {self.poison_label} in the batch")
            if self.action is Action.EXIT:
                os._exit(POISON_EXIT_STATUS)
            if self.action is Action.HANG:
                time.sleep(HANG_S)
        return super().predict(x, t, cond)


def register() -> None:
    """Make POISON_PIPELINE loadable in this process."""
    PIPELINE_FAMILIES[POISON_PIPELINE] = (PoisonDiT, "DiTTransformer2DModel", KL_COMPONENTS)


def build_poison_model(
    path: Path,
    image_model: Path,
    label: int,
    action: Action | None = None,
    oom_above_outputs: int | None = None,
) -> Path:
    """A copy of a tiny class-conditional image model (tests/tiny_models.py) that misbehaves."""
    shutil.copytree(image_model, path)
    index_file = path / "model_index.json"
    index = json.loads(index_file.read_text())
    index["_class_name"] = POISON_PIPELINE
    index[POISON_KEY] = {
        "label": label,
        "action": action.value if action else None,
        "oom_above_outputs": oom_above_outputs,
    }
    index_file.write_text(json.dumps(index, indent=2))
    return path


if __name__ == "__main__":
    register()
    from cli.main import main

    main(sys.argv[1:])
