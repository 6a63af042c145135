"""DPM-Solver++ (multistep, order 1 or 2) for rows at different steps.

Written to match `DPMSolverMultistepScheduler.step` (algorithm_type="dpmsolver++") operation for
operation (Lu et al. 2022, arXiv:2211.01095, and diffusers' implementation): each step turns the
model output into a data prediction x0, then

    x_t = (sigma_t / sigma_s0) x_s0 - alpha_t (e^{-h} - 1) D0 - c D1,   D0 = m0,  D1 = (m0 - m1) / r0,

with h = lambda_t - lambda_s0, r0 = h_0 / h, m0 this step's x0 and m1 the row's previous one;
c = alpha_t (e^{-h} - 1) / 2 for the midpoint solver, -alpha_t ((e^{-h} - 1) / h + 1) for Heun's.
The first step, and the last where diffusers lowers the order, are first order (c = 0). Which steps
are which depends only on the step index and the step count, so each row's order is its position's.
A row's only history is its previous x0.
"""

from dataclasses import dataclass
from typing import Any

import torch
from diffusers import DPMSolverMultistepScheduler

from worker.solvers.base import (
    History,
    SolverStep,
    alpha_sigma,
    check_multistep_options,
    check_schedule,
    data_prediction,
    gather,
    log_snr,
    refuse,
)

ALGORITHM = (
    "dpmsolver++"  # the data-prediction solver; "dpmsolver" (noise) and the SDE variants are not written
)
SOLVER_TYPES = ("midpoint", "heun")
# diffusers lowers the order near the end of short schedules "for numerical stability"
LOWER_ORDER_BELOW_STEPS = 15
PREVIOUS_X0 = "x0_previous"


@dataclass(frozen=True)
class DPMTable:
    """A DPM-Solver++ schedule for one step count, as per-step coefficients (each (S,) fp32)."""

    timesteps: torch.Tensor  # (S,) int64
    alpha: torch.Tensor  # alpha_s0 at each step's own sigma: turns the model output into x0
    sigma: torch.Tensor  # sigma_s0
    sample_scale: torch.Tensor  # sigma_t / sigma_s0
    x0_scale: torch.Tensor  # alpha_t (e^{-h} - 1)
    inv_r0: torch.Tensor  # 1 / r0 at second-order steps, 0 at first-order ones
    d1_scale: torch.Tensor  # c, subtracted from the D1 term; 0 at first-order steps
    prediction_type: str


def dpm_orders(config: Any, num_inference_steps: int) -> list[int]:
    """The order diffusers' `step` uses at each step index (solver_order 1 or 2)."""
    solver_order = int(config.solver_order)
    last = num_inference_steps - 1
    short = bool(config.lower_order_final) and num_inference_steps < LOWER_ORDER_BELOW_STEPS
    final_first_order = bool(config.euler_at_final) or short or config.final_sigmas_type == "zero"
    orders = []
    for index in range(num_inference_steps):
        lower_order_nums = min(index, solver_order)  # the scheduler's warm-up counter at this step
        first = solver_order == 1 or lower_order_nums < 1 or (index == last and final_first_order)
        orders.append(1 if first else 2)
    return orders


def dpm_table(scheduler: DPMSolverMultistepScheduler, num_inference_steps: int) -> DPMTable:
    """The coefficients `scheduler` would use at each step of `num_inference_steps`, if we can step it."""
    config = scheduler.config
    check_multistep_options(scheduler, config)
    if config.algorithm_type != ALGORITHM:
        raise refuse(scheduler, f"algorithm_type={config.algorithm_type!r} (only {ALGORITHM!r})")
    if config.solver_type not in SOLVER_TYPES:
        raise refuse(scheduler, f"solver_type={config.solver_type!r}")
    fresh = DPMSolverMultistepScheduler.from_config(config)
    fresh.set_timesteps(num_inference_steps)
    check_schedule(fresh.timesteps)
    flow = bool(config.use_flow_sigmas)
    sigmas = fresh.sigmas  # (S + 1,) fp32, the last one the final sigma
    columns: dict[str, list[torch.Tensor]] = {
        name: [] for name in ("alpha", "sigma", "sample_scale", "x0_scale", "inv_r0", "d1_scale")
    }
    zero = torch.zeros(())
    # Scalar by scalar, as the scheduler computes them, so every coefficient is the same float.
    for index, order in enumerate(dpm_orders(config, num_inference_steps)):
        alpha_t, sigma_t = alpha_sigma(sigmas[index + 1], flow)
        alpha_s0, sigma_s0 = alpha_sigma(sigmas[index], flow)
        h = log_snr(alpha_t, sigma_t) - log_snr(alpha_s0, sigma_s0)
        x0_scale = alpha_t * (torch.exp(-h) - 1.0)
        inv_r0, d1_scale = zero, zero
        if order == 2:
            alpha_s1, sigma_s1 = alpha_sigma(sigmas[index - 1], flow)
            r0 = (log_snr(alpha_s0, sigma_s0) - log_snr(alpha_s1, sigma_s1)) / h
            inv_r0 = 1.0 / r0
            if config.solver_type == "midpoint":
                d1_scale = 0.5 * x0_scale
            else:
                d1_scale = -(alpha_t * ((torch.exp(-h) - 1.0) / h + 1.0))
        values = (alpha_s0, sigma_s0, sigma_t / sigma_s0, x0_scale, inv_r0, d1_scale)
        for name, value in zip(columns, values, strict=True):
            columns[name].append(value.float())
    return DPMTable(
        timesteps=fresh.timesteps.clone(),
        **{name: torch.stack(values) for name, values in columns.items()},
        prediction_type=config.prediction_type,
    )


def dpm_update(
    table: DPMTable, pred: torch.Tensor, positions: torch.Tensor, x: torch.Tensor, x0_previous: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """One DPM-Solver++ step for rows at different steps.

    Args:
        table: the schedule's coefficients.
        pred: (N, C, *S) the model output.
        positions: (N,) each row's step index, on the CPU.
        x: (N, C, *S) each row's latents.
        x0_previous: (N, C, *S) each row's previous x0 (any finite value at its first step).

    Returns:
        (N, C, *S) each row's next latents, and (N, C, *S) this step's x0 (the row's next history).
    """
    alpha, sigma, sample_scale, x0_scale, inv_r0, d1_scale = gather(
        [table.alpha, table.sigma, table.sample_scale, table.x0_scale, table.inv_r0, table.d1_scale],
        positions,
        x,
    )  # each (N, 1, ...)
    x0 = data_prediction(table.prediction_type, pred, x, alpha, sigma)  # m0 = D0
    d1 = inv_r0 * (x0 - x0_previous)  # 0 at first-order steps
    return sample_scale * x - x0_scale * x0 - d1_scale * d1, x0


class DPMSolver:
    """DPM-Solver++'s per-row step; a row's history is its previous x0."""

    history_names: tuple[str, ...] = (PREVIOUS_X0,)

    def __init__(self, scheduler: DPMSolverMultistepScheduler, num_inference_steps: int):
        self.table = dpm_table(scheduler, num_inference_steps)
        self.timesteps = self.table.timesteps

    def step(
        self, pred: torch.Tensor, positions: torch.Tensor, x: torch.Tensor, history: History
    ) -> SolverStep:
        latents, x0 = dpm_update(self.table, pred, positions, x, history[PREVIOUS_X0])
        return SolverStep(latents, x0, {PREVIOUS_X0: x0})
