"""Continuous batching's pieces: the per-row DDIM step against diffusers, and rows joining mid-flight
(every family: DDIM for the bundled DiTs, DPM-Solver++ for PixArt, UniPC for Wan). The multistep
solvers' steps against diffusers' are in tests/test_row_solvers.py."""

from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import DDIMScheduler

from dit_serve.contract import ConditioningKind
from models.loading import LoadedModel, RowCondition, load_model
from worker.continuous import RunningBatch, supports_continuous
from worker.sampling import generate
from worker.solvers.ddim import ddim_step, ddim_table

CPU = torch.device("cpu")
MAX_PIXEL_DIFF = 1  # out of 255
STEPS = 6  # enough for second-order multistep steps with history on both sides of every join
FRAMES = {"img": 1, "vid": 4, "pixart-sigma": 1, "wan": 5}  # Wan takes 1 + 4k frames
# Wan's causal 3D VAE makes its model tests the slowest here; its UniPC steps are checked one by one
# against diffusers' in tests/test_row_solvers.py, and RunningBatch's history plumbing with PixArt's.
WAN = pytest.param("wan", marks=pytest.mark.slow)
JOINING = [
    pytest.param("img", marks=pytest.mark.slow),
    pytest.param("vid", marks=pytest.mark.slow),
    "pixart-sigma",
    WAN,
]
PROMPTS = ["a red fox under the sky", "a blue car in the city at night", "a small bird", "green hills"]


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction", "sample"])
@pytest.mark.parametrize("clip_sample", [False, True])
@pytest.mark.parametrize("spacing", ["leading", "trailing"])
def test_per_row_ddim_step_is_diffusers_step(prediction_type: str, clip_sample: bool, spacing: str) -> None:
    scheduler = DDIMScheduler(
        beta_schedule="linear",
        prediction_type=prediction_type,
        clip_sample=clip_sample,
        timestep_spacing=spacing,
    )
    table = ddim_table(scheduler, STEPS)
    scheduler.set_timesteps(STEPS)
    assert torch.equal(table.timesteps, scheduler.timesteps)
    generator = torch.Generator().manual_seed(0)
    x = torch.randn((len(scheduler.timesteps), 4, 8, 8), generator=generator)
    pred = torch.randn(x.shape, generator=generator)
    # every row at a different step of the schedule, in one call
    ours = ddim_step(table, pred, scheduler.timesteps.clone(), x)
    for row, t in enumerate(scheduler.timesteps):
        expected = scheduler.step(pred[row : row + 1], t, x[row : row + 1]).prev_sample
        assert torch.allclose(ours[row : row + 1], expected, atol=1e-6, rtol=0), f"row {row} at t={int(t)}"


@pytest.fixture(scope="module")
def model(request: pytest.FixtureRequest, model_dirs: dict[str, Path]) -> LoadedModel:
    return load_model(request.param, model_dirs[request.param], CPU)


def _condition(model: LoadedModel, k: int) -> RowCondition:
    """Request k's condition: a class label or a prompt (and a negative prompt for odd k)."""
    if model.conditioning == ConditioningKind.TEXT:
        return RowCondition(prompt=PROMPTS[k], negative_prompt="blurry" if k % 2 else "")
    return RowCondition(class_label=3 + 2 * k)


def _alone(model: LoadedModel, condition: RowCondition, seed: int, guidance: float) -> np.ndarray:
    pixels, _ = generate(model, [condition], [seed], [guidance], STEPS, 32, 32, FRAMES[model.name])
    return pixels[0].numpy().astype(int)


@pytest.mark.parametrize("model", JOINING, indirect=True)
def test_rows_joining_mid_flight_match_their_solo_runs(model: LoadedModel) -> None:
    """DDIM (DiT), DPM-Solver++ (PixArt) and UniPC (Wan) rows carry their own solver history through joins."""
    assert supports_continuous(model)
    batch = RunningBatch(model, STEPS, 32, 32, FRAMES[model.name])
    requests = {  # id: (condition, seed, guidance, the step boundary at which it joins)
        "a": (_condition(model, 0), 11, 4.0, 0),
        "b": (_condition(model, 1), 12, 1.0, 0),
        "c": (_condition(model, 2), 13, 6.0, 3),
        "d": (_condition(model, 0), 14, 2.5, 5),
    }
    rows: dict[int, str] = {}
    done: dict[str, np.ndarray] = {}
    phases = set()
    for boundary in range(3 * STEPS):
        for name, (condition, seed, guidance, joins) in requests.items():
            if joins == boundary:
                (row,) = batch.add([condition], [seed], [guidance])
                rows[row] = name
        finished = batch.finished()
        if finished:
            pixels = model.decode(batch.pop(finished)).numpy().astype(int)
            done |= {rows[row]: array for row, array in zip(finished, pixels, strict=True)}
        if not len(batch):
            break
        phases.add(len(set(batch.steps_done().values())))
        batch.step()
    assert max(phases) == 3  # rows at three different steps shared a forward pass
    assert sorted(done) == ["a", "b", "c", "d"]
    for name, (condition, seed, guidance, _) in requests.items():
        diff = np.abs(done[name] - _alone(model, condition, seed, guidance)).max()
        assert diff <= MAX_PIXEL_DIFF, f"row {name} is {diff}/255 off its solo run"
    assert (
        np.abs(done["a"] - done["d"]).max() > 10
    )  # same condition, other seed: the comparison means something


@pytest.mark.parametrize("model", ["img", "vid", "pixart-sigma", WAN], indirect=True)
def test_a_dropped_row_leaves_the_others_unchanged(model: LoadedModel) -> None:
    batch = RunningBatch(model, STEPS, 32, 32, FRAMES[model.name])
    keep_condition = _condition(model, 1)
    (gone,) = batch.add([_condition(model, 2)], [22], [4.0])
    batch.step()
    (keep,) = batch.add([keep_condition], [21], [4.0])  # behind the row that goes, a step later
    for _ in range(3):
        batch.step()
    batch.drop([gone])
    while not batch.finished():
        batch.step()
    assert batch.finished() == [keep]
    pixels = model.decode(batch.pop([keep]))[0].numpy().astype(int)
    assert np.abs(pixels - _alone(model, keep_condition, 21, 4.0)).max() <= MAX_PIXEL_DIFF
    assert len(batch) == 0
