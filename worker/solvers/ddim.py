"""DDIM (eta = 0) for rows at different steps, written to match `DDIMScheduler.step` operation for
operation. DDIM is one-step: a row needs no history."""

from dataclasses import dataclass

import torch
from diffusers import DDIMScheduler

from worker.solvers.base import History, SolverStep, refuse

DDIM_PREDICTION_TYPES = ("epsilon", "sample", "v_prediction")


@dataclass(frozen=True)
class DDIMTable:
    """A DDIM schedule for one step count, as per-row lookups."""

    timesteps: torch.Tensor  # (S,) the schedule, first to last
    alphas_cumprod: torch.Tensor  # (T,) fp32
    final_alpha_cumprod: float
    step_size: int  # num_train_timesteps // num_inference_steps: DDIM's previous-timestep rule
    prediction_type: str
    clip_range: float | None


def ddim_table(scheduler: DDIMScheduler, num_inference_steps: int) -> DDIMTable:
    """The schedule `scheduler` would run for `num_inference_steps`, if it is a DDIM one we can step."""
    config = scheduler.config
    if config.thresholding:
        raise refuse(scheduler, "dynamic thresholding")
    if config.prediction_type not in DDIM_PREDICTION_TYPES:
        raise refuse(scheduler, f"prediction_type={config.prediction_type!r}")
    fresh = DDIMScheduler.from_config(config)
    fresh.set_timesteps(num_inference_steps)
    return DDIMTable(
        timesteps=fresh.timesteps.clone(),
        alphas_cumprod=fresh.alphas_cumprod.float(),
        final_alpha_cumprod=float(fresh.final_alpha_cumprod),
        step_size=config.num_train_timesteps // num_inference_steps,
        prediction_type=config.prediction_type,
        clip_range=float(config.clip_sample_range) if config.clip_sample else None,
    )


def ddim_step(table: DDIMTable, pred: torch.Tensor, timesteps: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """One deterministic DDIM update (eta = 0) for rows at different timesteps: ddim_update's latents."""
    return ddim_update(table, pred, timesteps, x)[0]


def ddim_update(
    table: DDIMTable, pred: torch.Tensor, timesteps: torch.Tensor, x: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """One deterministic DDIM update (eta = 0) for rows at different timesteps.

    Args:
        table: the schedule.
        pred: (N, C, *S) model output (eps, x0 or v, per the table's prediction type).
        timesteps: (N,) each row's current timestep, on the CPU.
        x: (N, C, *S) each row's current latents.

    Returns:
        (N, C, *S) latents at each row's previous timestep, and (N, C, *S) the predicted clean latents.
    """
    previous = timesteps - table.step_size  # (N,)
    alpha_t = table.alphas_cumprod[timesteps]  # (N,)
    alpha_prev = torch.where(
        previous >= 0, table.alphas_cumprod[previous.clamp(min=0)], torch.tensor(table.final_alpha_cumprod)
    )
    shape = (-1, *([1] * (x.dim() - 1)))
    alpha_t = alpha_t.view(shape).to(x.device)  # (N, 1, ...)
    alpha_prev = alpha_prev.view(shape).to(x.device)
    beta_t = 1 - alpha_t
    if table.prediction_type == "epsilon":
        x0 = (x - beta_t ** (0.5) * pred) / alpha_t ** (0.5)
        eps = pred
    elif table.prediction_type == "sample":
        x0 = pred
        eps = (x - alpha_t ** (0.5) * x0) / beta_t ** (0.5)
    else:  # v_prediction
        x0 = (alpha_t**0.5) * x - (beta_t**0.5) * pred
        eps = (alpha_t**0.5) * pred + (beta_t**0.5) * x
    if table.clip_range is not None:
        x0 = x0.clamp(-table.clip_range, table.clip_range)
    direction = (1 - alpha_prev) ** (0.5) * eps
    return alpha_prev ** (0.5) * x0 + direction, x0


class DDIMSolver:
    """DDIM's per-row step: no history."""

    history_names: tuple[str, ...] = ()

    def __init__(self, scheduler: DDIMScheduler, num_inference_steps: int):
        self.table = ddim_table(scheduler, num_inference_steps)
        self.timesteps = self.table.timesteps

    def step(
        self, pred: torch.Tensor, positions: torch.Tensor, x: torch.Tensor, history: History
    ) -> SolverStep:
        latents, clean = ddim_update(self.table, pred, self.timesteps[positions], x)
        return SolverStep(latents, clean, history)
