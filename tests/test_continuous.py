"""Continuous batching's pieces: the per-row DDIM step against diffusers, and rows joining mid-flight."""

from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import DDIMScheduler, DPMSolverMultistepScheduler

from models.loading import LoadedModel, RowCondition, load_model
from worker.continuous import RunningBatch, UnsupportedScheduler, ddim_step, ddim_table
from worker.sampling import generate

CPU = torch.device("cpu")
MAX_PIXEL_DIFF = 1  # out of 255
STEPS = 8


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


def test_a_scheduler_without_a_per_row_step_is_named() -> None:
    with pytest.raises(UnsupportedScheduler, match="DPMSolverMultistepScheduler"):
        ddim_table(DPMSolverMultistepScheduler(), STEPS)


@pytest.fixture(scope="module", params=["img", "vid"])
def model(request: pytest.FixtureRequest, model_dirs: dict[str, Path]) -> LoadedModel:
    return load_model(request.param, model_dirs[request.param], CPU)


def _frames(model: LoadedModel) -> int:
    return 4 if model.kind == "video" else 1


def _alone(model: LoadedModel, label: int, seed: int, guidance: float) -> np.ndarray:
    pixels, _ = generate(
        model, [RowCondition(class_label=label)], [seed], [guidance], STEPS, 32, 32, _frames(model)
    )
    return pixels[0].numpy().astype(int)


@pytest.mark.slow
def test_rows_joining_mid_flight_match_their_solo_runs(model: LoadedModel) -> None:
    batch = RunningBatch(model, STEPS, 32, 32, _frames(model))
    requests = {  # id: (label, seed, guidance, the step boundary at which it joins)
        "a": (3, 11, 4.0, 0),
        "b": (7, 12, 1.0, 0),
        "c": (9, 13, 6.0, 3),
        "d": (3, 14, 2.5, 5),
    }
    rows: dict[int, str] = {}
    done: dict[str, np.ndarray] = {}
    for boundary in range(3 * STEPS):
        for name, (label, seed, guidance, joins) in requests.items():
            if joins == boundary:
                (row,) = batch.add([RowCondition(class_label=label)], [seed], [guidance])
                rows[row] = name
        finished = batch.finished()
        if finished:
            pixels = model.decode(batch.pop(finished)).numpy().astype(int)
            done |= {rows[row]: array for row, array in zip(finished, pixels, strict=True)}
        if not len(batch):
            break
        batch.step()
    assert sorted(done) == ["a", "b", "c", "d"]
    for name, (label, seed, guidance, _) in requests.items():
        diff = np.abs(done[name] - _alone(model, label, seed, guidance)).max()
        assert diff <= MAX_PIXEL_DIFF, f"row {name} is {diff}/255 off its solo run"
    assert np.abs(done["a"] - done["d"]).max() > 10  # same label, other seed: the comparison means something


def test_a_dropped_row_leaves_the_others_unchanged(model: LoadedModel) -> None:
    batch = RunningBatch(model, STEPS, 32, 32, _frames(model))
    keep, gone = batch.add([RowCondition(class_label=1), RowCondition(class_label=2)], [21, 22], [4.0, 4.0])
    for _ in range(3):
        batch.step()
    batch.drop([gone])
    while not batch.finished():
        batch.step()
    assert batch.finished() == [keep]
    pixels = model.decode(batch.pop([keep]))[0].numpy().astype(int)
    assert np.abs(pixels - _alone(model, 1, 21, 4.0)).max() <= MAX_PIXEL_DIFF
    assert len(batch) == 0
