"""The per-row multistep solvers against diffusers: rows that joined at different steps, stepped
together, each follow the update sequence its scheduler gives it run alone."""

from collections.abc import Callable

import pytest
import torch
from diffusers import (
    DDIMScheduler,
    DPMSolverMultistepScheduler,
    EulerDiscreteScheduler,
    UniPCMultistepScheduler,
)
from diffusers.schedulers.scheduling_utils import SchedulerMixin

from worker.solvers.base import History, UnsupportedScheduler
from worker.solvers.registry import row_solver

SHAPE = (4, 4, 4)
ATOL = 1e-6  # the updates are written operation for operation: equal in practice, fp32 in principle
WAN = {"prediction_type": "flow_prediction", "use_flow_sigmas": True, "flow_shift": 3.0}
SCHEDULERS: dict[str, Callable[[], SchedulerMixin]] = {
    # PixArt's (tests/tiny_text_models.py, bench/families.py): the default DPM-Solver++ 2M midpoint
    "dpm++-pixart": DPMSolverMultistepScheduler,
    "dpm++-heun": lambda: DPMSolverMultistepScheduler(solver_type="heun"),
    "dpm++-v-trailing": lambda: DPMSolverMultistepScheduler(
        prediction_type="v_prediction", timestep_spacing="trailing"
    ),
    "dpm++-sigma-min-no-lower-order": lambda: DPMSolverMultistepScheduler(
        final_sigmas_type="sigma_min", lower_order_final=False
    ),
    "dpm++-sample": lambda: DPMSolverMultistepScheduler(prediction_type="sample"),
    "dpm++-euler-at-final": lambda: DPMSolverMultistepScheduler(euler_at_final=True),
    "dpm++-first-order": lambda: DPMSolverMultistepScheduler(solver_order=1),
    "dpm++-flow": lambda: DPMSolverMultistepScheduler(**WAN),
    # Wan 2.1's: UniPC bh2 on flow-matching sigmas shifted by 3
    "unipc-wan": lambda: UniPCMultistepScheduler(**WAN),
    "unipc-default": UniPCMultistepScheduler,
    "unipc-v-trailing": lambda: UniPCMultistepScheduler(
        prediction_type="v_prediction", timestep_spacing="trailing"
    ),
    "unipc-corrector-off-at-2": lambda: UniPCMultistepScheduler(disable_corrector=[2], **WAN),
    "unipc-no-lower-order-final": lambda: UniPCMultistepScheduler(lower_order_final=False, **WAN),
    "unipc-first-order": lambda: UniPCMultistepScheduler(solver_order=1, **WAN),
    "ddim": DDIMScheduler,
}


def _alone(
    scheduler: SchedulerMixin, steps: int, x: torch.Tensor, preds: list[torch.Tensor]
) -> list[torch.Tensor]:
    """A row's latents after each step, from diffusers' scheduler run on that row alone."""
    scheduler.set_timesteps(steps)
    trajectory = []
    for pred, t in zip(preds, scheduler.timesteps, strict=True):
        x = scheduler.step(pred, t, x).prev_sample
        trajectory.append(x)
    return trajectory


def _staggered(
    scheduler: SchedulerMixin, steps: int, noise: torch.Tensor, preds: torch.Tensor, joins: list[int]
) -> list[list[torch.Tensor]]:
    """Every row's latents after each step, all rows stepped together by the row solver, row r
    joining at step boundary joins[r] and leaving when done (as RunningBatch adds and pops them)."""
    solver = row_solver(scheduler, steps)
    rows: list[int] = []
    positions = torch.zeros(0, dtype=torch.long)
    x = torch.zeros((0, *SHAPE))
    history: History = {name: x for name in solver.history_names}
    trajectories: list[list[torch.Tensor]] = [[] for _ in joins]
    mixed = False
    for boundary in range(max(joins) + steps):
        new = [row for row, joins_at in enumerate(joins) if joins_at == boundary]
        rows += new
        positions = torch.cat([positions, torch.zeros(len(new), dtype=torch.long)])
        x = torch.cat([x, noise[new]])
        history = {name: torch.cat([past, torch.zeros_like(noise[new])]) for name, past in history.items()}
        keep = positions < steps
        rows = [row for row, kept in zip(rows, keep.tolist(), strict=True) if kept]
        positions, x = positions[keep], x[keep]
        history = {name: past[keep] for name, past in history.items()}
        if not rows:
            continue
        mixed |= positions.unique().numel() == len(rows) > 2
        pred = preds[rows, positions]  # (N, *SHAPE): each row's model output at its own step
        out = solver.step(pred, positions, x, history)
        x, history = out.latents, out.history
        for row, latents in zip(rows, x, strict=True):
            trajectories[row].append(latents.unsqueeze(0))
        positions = positions + 1
    assert mixed, "the rows never were all at different steps at once"
    return trajectories


@pytest.mark.parametrize("name", list(SCHEDULERS))
@pytest.mark.parametrize("steps", [6, 16])
def test_rows_at_different_steps_each_follow_their_scheduler_run_alone(name: str, steps: int) -> None:
    make = SCHEDULERS[name]
    joins = [0, 1, 2, 3, 5, steps - 1, steps, steps + 1]  # mid-flight, at the last step, after some finish
    generator = torch.Generator().manual_seed(0)
    noise = torch.randn((len(joins), *SHAPE), generator=generator)
    preds = torch.randn((len(joins), steps, *SHAPE), generator=generator)
    ours = _staggered(make(), steps, noise, preds, joins)
    for row in range(len(joins)):
        expected = _alone(make(), steps, noise[row : row + 1], list(preds[row].unsqueeze(1)))
        assert len(ours[row]) == steps
        for step, (got, want) in enumerate(zip(ours[row], expected, strict=True)):
            assert torch.allclose(got, want, atol=ATOL, rtol=0), f"{name}: row {row} off at step {step}"


@pytest.mark.parametrize("name", ["dpm++-pixart", "unipc-wan"])
def test_clean_is_the_step_data_prediction(name: str) -> None:
    """The previews' x0: what the scheduler's own conversion gives for the latents the model saw."""
    scheduler = SCHEDULERS[name]()
    solver = row_solver(scheduler, 6)
    scheduler.set_timesteps(6)
    generator = torch.Generator().manual_seed(1)
    x = torch.randn((6, *SHAPE), generator=generator)
    pred = torch.randn(x.shape, generator=generator)
    positions = torch.arange(6)
    history = {name: torch.zeros_like(x) for name in solver.history_names}
    clean = solver.step(pred, positions, x, history).clean
    for row in range(6):
        scheduler._step_index = row  # convert_model_output reads the sigma at the scheduler's own step
        expected = scheduler.convert_model_output(pred[row : row + 1], sample=x[row : row + 1])
        assert torch.allclose(clean[row : row + 1], expected, atol=ATOL, rtol=0)


@pytest.mark.parametrize(
    ("scheduler", "named"),
    [
        (EulerDiscreteScheduler(), "EulerDiscreteScheduler has no per-row step"),
        (DPMSolverMultistepScheduler(thresholding=True), "dynamic thresholding"),
        (DPMSolverMultistepScheduler(algorithm_type="sde-dpmsolver++"), "algorithm_type='sde-dpmsolver++'"),
        (DPMSolverMultistepScheduler(solver_order=3), "solver_order=3"),
        (DPMSolverMultistepScheduler(use_karras_sigmas=True), "Karras sigmas"),
        (DPMSolverMultistepScheduler(variance_type="learned_range"), "learned variance_type"),
        (UniPCMultistepScheduler(solver_type="bh1"), "solver_type='bh1'"),
        (UniPCMultistepScheduler(predict_x0=False), "predict_x0=False"),
        (UniPCMultistepScheduler(use_dynamic_shifting=True, **WAN), "dynamic shifting"),
        (UniPCMultistepScheduler(prediction_type="flow_prediction"), "flow_prediction on a diffusion"),
        (DDIMScheduler(thresholding=True), "dynamic thresholding"),
    ],
)
def test_unsupported_schedulers_and_options_are_named(scheduler: SchedulerMixin, named: str) -> None:
    with pytest.raises(UnsupportedScheduler, match="batches statically") as raised:
        row_solver(scheduler, 6)
    assert named in str(raised.value)
