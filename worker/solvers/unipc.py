"""UniPC (multistep, order 1 or 2, B(h) = e^h - 1, data prediction) for rows at different steps.

Written to match `UniPCMultistepScheduler.step` operation for operation (Zhao et al. 2023,
arXiv:2302.04867, and diffusers' implementation). A step at index i first corrects the row's latents
x_i with the model's new data prediction (UniC), unless it is the row's first step, then predicts
x_{i+1} (UniP):

    UniC: x_i <- (sigma_i / sigma_{i-1}) x_{i-1} - alpha_i h_phi_1 m0
                  - alpha_i B_h (rho_0 D1 + rho_c (x0_i - m0))
    UniP: x_{i+1} = (sigma_{i+1} / sigma_i) x_i - alpha_{i+1} h_phi_1 x0_i - alpha_{i+1} B_h rho_p D1

with m0 = x0_{i-1}, D1 = (m1 - m0) / r_k the divided difference to the step before, and the rhos from
the B(h) conditions (rho_p = 1/2 at order 2; rho_c solved from the 2x2 system at order 2, 1/2 at 1).
The orders are warm-up (order 1 first) and `lower_order_final` (order 1 last): functions of the step
index and step count only, so a row's orders are its position's. A row's history: its last two data
predictions and the corrected latents of its previous step.
"""

from dataclasses import dataclass
from typing import Any

import torch
from diffusers import UniPCMultistepScheduler

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

SOLVER_TYPE = "bh2"  # B(h) = e^h - 1, Wan's and diffusers' default; bh1 gives NaN with a final sigma of 0
PREDICTOR_RHO = 0.5  # rho_p at order 2, diffusers' "simplified version"
CORRECTOR_RHO_FIRST_ORDER = 0.5
PREVIOUS_X0, EARLIER_X0, LAST_SAMPLE = "x0_previous", "x0_earlier", "last_sample"
COLUMNS = (
    # converting the model output at the step's own sigma
    "alpha",
    "sigma",
    # the corrector of the latents the model saw (UniC); on = 0 where there is none
    "c_on",
    "c_sample_scale",
    "c_x0_scale",
    "c_residual_scale",
    "c_rk",
    "c_rho_earlier",
    "c_rho_this",
    # the predictor of the next latents (UniP)
    "p_sample_scale",
    "p_x0_scale",
    "p_residual_scale",
    "p_rk",
    "p_rho",
)


@dataclass(frozen=True)
class UniPCTable:
    """A UniPC schedule for one step count: per-step coefficients, each (S,) fp32, by COLUMNS name."""

    timesteps: torch.Tensor  # (S,) int64
    columns: dict[str, torch.Tensor]
    prediction_type: str


def unipc_orders(config: Any, num_inference_steps: int) -> list[int]:
    """The predictor order diffusers' `step` uses at each step index (`this_order`)."""
    solver_order = int(config.solver_order)
    orders = []
    for index in range(num_inference_steps):
        order = solver_order
        if config.lower_order_final:
            order = min(solver_order, num_inference_steps - index)
        orders.append(min(order, min(index, solver_order) + 1))  # warm-up: lower_order_nums + 1
    return orders


def _bh_coefficients(
    sigmas: torch.Tensor, flow: bool, t: int, s0: int, earlier: int | None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """One UniP or UniC update from sigma index s0 to t, scalar by scalar as the scheduler computes it.

    Returns:
        sigma_t / sigma_s0, alpha_t h_phi_1, alpha_t B_h, r_k (1 at order 1), and the B(h) system's
        R (order, order) and b (order,): order 2 where `earlier` (the index before s0) is given.
    """
    alpha_t, sigma_t = alpha_sigma(sigmas[t], flow)
    alpha_s0, sigma_s0 = alpha_sigma(sigmas[s0], flow)
    lambda_s0 = log_snr(alpha_s0, sigma_s0)
    h = log_snr(alpha_t, sigma_t) - lambda_s0
    rks = []
    if earlier is not None:
        rks.append((log_snr(*alpha_sigma(sigmas[earlier], flow)) - lambda_s0) / h)
    rks.append(torch.ones(()))
    rk = torch.stack(rks)
    hh = -h  # data prediction
    h_phi_1 = torch.expm1(hh)  # h phi_1(h) = e^h - 1
    h_phi_k = h_phi_1 / hh - 1
    b_h = torch.expm1(hh)  # bh2
    factorial_i = 1
    r_rows, b = [], []
    for i in range(1, len(rks) + 1):
        r_rows.append(torch.pow(rk, i - 1))
        b.append(h_phi_k * factorial_i / b_h)
        factorial_i *= i + 1
        h_phi_k = h_phi_k / hh - 1 / factorial_i
    return sigma_t / sigma_s0, alpha_t * h_phi_1, alpha_t * b_h, rk[0], torch.stack(r_rows), torch.stack(b)


def unipc_table(scheduler: UniPCMultistepScheduler, num_inference_steps: int) -> UniPCTable:
    """The coefficients `scheduler` would use at each step of `num_inference_steps`, if we can step it."""
    config = scheduler.config
    check_multistep_options(scheduler, config)
    if not config.predict_x0:
        raise refuse(scheduler, "predict_x0=False (the noise-prediction form)")
    if config.solver_type != SOLVER_TYPE:
        raise refuse(scheduler, f"solver_type={config.solver_type!r} (only {SOLVER_TYPE!r})")
    if getattr(scheduler, "solver_p", None) is not None:
        raise refuse(scheduler, "a solver_p predictor")
    fresh = UniPCMultistepScheduler.from_config(config)
    fresh.set_timesteps(num_inference_steps)
    check_schedule(fresh.timesteps)
    flow, sigmas = bool(config.use_flow_sigmas), fresh.sigmas  # (S + 1,) fp32
    disabled = set(config.disable_corrector)
    orders = unipc_orders(config, num_inference_steps)
    zero, one = torch.zeros(()), torch.ones(())
    rows: list[tuple[torch.Tensor, ...]] = []
    for index, order in enumerate(orders):
        alpha, sigma = alpha_sigma(sigmas[index], flow)
        # No corrector (a row's first step, or disabled): off, weighing nothing, r_k 1 so nothing divides by 0
        corrector: tuple[torch.Tensor, ...] = (zero, zero, zero, zero, one, zero, zero)
        if index > 0 and index - 1 not in disabled:
            # UniC at this step has the order of the previous step's predictor
            earlier = index - 2 if orders[index - 1] == 2 else None
            scale, x0_scale, residual_scale, rk, r, b = _bh_coefficients(
                sigmas, flow, index, index - 1, earlier
            )
            if earlier is None:
                rhos, rho_earlier = torch.tensor([CORRECTOR_RHO_FIRST_ORDER]), zero
            else:
                rhos = torch.linalg.solve(r, b)
                rho_earlier = rhos[0]
            corrector = (one, scale, x0_scale, residual_scale, rk, rho_earlier, rhos[-1])
        scale, x0_scale, residual_scale, rk, _, _ = _bh_coefficients(
            sigmas, flow, index + 1, index, index - 1 if order == 2 else None
        )
        predictor = (scale, x0_scale, residual_scale, rk, torch.tensor(PREDICTOR_RHO if order == 2 else 0.0))
        rows.append((alpha, sigma, *corrector, *predictor))
    table = torch.stack([torch.stack([value.float() for value in row]) for row in rows])  # (S, K)
    return UniPCTable(
        timesteps=fresh.timesteps.clone(),
        columns={name: table[:, k].contiguous() for k, name in enumerate(COLUMNS)},
        prediction_type=config.prediction_type,
    )


def unipc_update(
    table: UniPCTable, pred: torch.Tensor, positions: torch.Tensor, x: torch.Tensor, history: History
) -> tuple[torch.Tensor, torch.Tensor, History]:
    """One UniPC step (corrector, then predictor) for rows at different steps.

    Args:
        table: the schedule's coefficients.
        pred: (N, C, *S) the model output.
        positions: (N,) each row's step index, on the CPU.
        x: (N, C, *S) each row's latents, as the model saw them (before correction).
        history: each row's PREVIOUS_X0, EARLIER_X0 and LAST_SAMPLE, (N, C, *S) each (any finite
            values where the row has not made those steps yet).

    Returns:
        (N, C, *S) each row's next latents, (N, C, *S) this step's x0, and the rows' new history.
    """
    c = dict(zip(COLUMNS, gather(list(table.columns.values()), positions, x), strict=True))  # (N, 1, ...)
    x0 = data_prediction(table.prediction_type, pred, x, c["alpha"], c["sigma"])
    m0, m1, last = history[PREVIOUS_X0], history[EARLIER_X0], history[LAST_SAMPLE]
    correction = c["c_rho_earlier"] * ((m1 - m0) / c["c_rk"]) + c["c_rho_this"] * (x0 - m0)
    corrected = c["c_sample_scale"] * last - c["c_x0_scale"] * m0 - c["c_residual_scale"] * correction
    x = torch.where(c["c_on"] > 0, corrected, x)
    residual = c["p_rho"] * ((m0 - x0) / c["p_rk"])
    latents = c["p_sample_scale"] * x - c["p_x0_scale"] * x0 - c["p_residual_scale"] * residual
    return latents, x0, {PREVIOUS_X0: x0, EARLIER_X0: m0, LAST_SAMPLE: x}


class UniPCSolver:
    """UniPC's per-row step; a row's history is its last two x0 and its previous corrected latents."""

    history_names: tuple[str, ...] = (PREVIOUS_X0, EARLIER_X0, LAST_SAMPLE)

    def __init__(self, scheduler: UniPCMultistepScheduler, num_inference_steps: int):
        self.table = unipc_table(scheduler, num_inference_steps)
        self.timesteps = self.table.timesteps

    def step(
        self, pred: torch.Tensor, positions: torch.Tensor, x: torch.Tensor, history: History
    ) -> SolverStep:
        latents, x0, history = unipc_update(self.table, pred, positions, x, history)
        return SolverStep(latents, x0, history)
