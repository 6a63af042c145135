"""What every row solver shares: the contract RunningBatch steps through, and the schedule's maths.

A row solver is one scheduler's update written for a batch whose rows are at different steps of one
schedule. Everything a step needs that depends on the step (sigmas, orders, solver coefficients) is a
table over step indices, built once per step count; each row gathers its entries by its position, so
one vectorised update serves every row at once. Whatever a multistep solver remembers of a row's past
steps (past data predictions, the last sample) is that row's history: tensors shaped like its latents,
which RunningBatch keeps, grows and filters with its rows.
"""

from typing import NamedTuple, Protocol

import torch

# A solver's per-row memory, by name; every value is (N, C, *S), row-aligned with the latents.
History = dict[str, torch.Tensor]
PREDICTION_TYPES = ("epsilon", "sample", "v_prediction", "flow_prediction")
FLOW_PREDICTION = "flow_prediction"
MAX_SOLVER_ORDER = 2  # what our families use (PixArt's DPM-Solver++, Wan's UniPC); order 3 is not written
# Multistep scheduler options that change the update or the schedule in ways not written here.
UNSUPPORTED_OPTIONS = {
    "thresholding": "dynamic thresholding",
    "use_karras_sigmas": "Karras sigmas",
    "use_exponential_sigmas": "exponential sigmas",
    "use_beta_sigmas": "beta sigmas",
    "use_lu_lambdas": "uniform-logSNR (Lu) lambdas",
    "use_dynamic_shifting": "dynamic shifting (a per-resolution mu)",
}
LEARNED_VARIANCE = ("learned", "learned_range")


class UnsupportedScheduler(ValueError):
    """A scheduler or option with no per-row step here; the worker batches such models statically."""


class SolverStep(NamedTuple):
    """One step's results for every row."""

    latents: torch.Tensor  # (N, C, *S) each row's latents at its next step
    clean: torch.Tensor  # (N, C, *S) each row's predicted clean latents (x0), for previews
    history: History  # each row's history after this step


class RowSolver(Protocol):
    """A scheduler's update for rows at different steps of one schedule."""

    timesteps: torch.Tensor  # (S,) the schedule, first to last, on the CPU
    history_names: tuple[str, ...]  # the names of the per-row history tensors this solver keeps

    def step(
        self, pred: torch.Tensor, positions: torch.Tensor, x: torch.Tensor, history: History
    ) -> SolverStep:
        """Advance every row one step.

        Args:
            pred: (N, C, *S) the guided model output.
            positions: (N,) each row's steps done, on the CPU: its index into the schedule.
            x: (N, C, *S) each row's current latents (the ones the model saw).
            history: each row's history (zeros for a row at step 0).
        """
        ...


def refuse(scheduler: object, reason: str) -> UnsupportedScheduler:
    """The error for a scheduler option we have no per-row step for, saying what happens instead."""
    return UnsupportedScheduler(
        f"{type(scheduler).__name__} with {reason} has no per-row step for continuous batching; "
        "its model batches statically"
    )


def check_multistep_options(scheduler: object, config: object) -> None:
    """Refuse the options of DPM-Solver and UniPC that the per-row steps here do not follow."""
    for option, what in UNSUPPORTED_OPTIONS.items():
        if getattr(config, option, False):
            raise refuse(scheduler, what)
    prediction_type = getattr(config, "prediction_type", None)
    if prediction_type not in PREDICTION_TYPES:
        raise refuse(scheduler, f"prediction_type={prediction_type!r}")
    if prediction_type == FLOW_PREDICTION and not getattr(config, "use_flow_sigmas", False):
        raise refuse(scheduler, "flow_prediction on a diffusion (not flow) schedule")
    if getattr(config, "variance_type", None) in LEARNED_VARIANCE:
        raise refuse(scheduler, "a learned variance_type (the scheduler slices the model output)")
    order = getattr(config, "solver_order", None)
    if not isinstance(order, int) or not 1 <= order <= MAX_SOLVER_ORDER:
        raise refuse(scheduler, f"solver_order={order!r} (1 and {MAX_SOLVER_ORDER} are supported)")


def check_schedule(timesteps: torch.Tensor) -> None:
    """Refuse a schedule that repeats a timestep: diffusers then starts at the timestep's second
    occurrence (`index_for_timestep`), which a per-row position cannot follow."""
    if timesteps.unique().numel() != timesteps.numel():
        raise UnsupportedScheduler(
            f"the schedule repeats a timestep ({timesteps.tolist()}): batch this request statically"
        )


def alpha_sigma(sigmas: torch.Tensor, flow: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """(alpha_t, sigma_t) of x_t = alpha_t x0 + sigma_t eps from a schedule's sigmas, as diffusers'
    multistep schedulers compute them (`_sigma_to_alpha_sigma_t`), elementwise."""
    if flow:
        return 1 - sigmas, sigmas
    alpha = 1 / ((sigmas**2 + 1) ** 0.5)
    return alpha, sigmas * alpha


def log_snr(alpha: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """lambda_t = log(alpha_t) - log(sigma_t), DPM-Solver's time variable (+inf where sigma is 0)."""
    return torch.log(alpha) - torch.log(sigma)


def data_prediction(
    prediction_type: str, pred: torch.Tensor, x: torch.Tensor, alpha: torch.Tensor, sigma: torch.Tensor
) -> torch.Tensor:
    """The model output as a data (x0) prediction, as the multistep schedulers' `convert_model_output`.

    Args:
        prediction_type: what the model predicts (PREDICTION_TYPES).
        pred: (N, C, *S) the model output.
        x: (N, C, *S) the latents it was predicted from.
        alpha, sigma: (N, 1, ...) each row's alpha_t and sigma_t (for flow matching sigma_t = sigma).

    Returns:
        (N, C, *S) x0.
    """
    if prediction_type == "epsilon":
        return (x - sigma * pred) / alpha
    if prediction_type == "sample":
        return pred
    if prediction_type == "v_prediction":
        return alpha * x - sigma * pred
    return x - sigma * pred  # flow_prediction: x_t = (1 - sigma) x0 + sigma eps, v = eps - x0


def gather(columns: list[torch.Tensor], positions: torch.Tensor, x: torch.Tensor) -> list[torch.Tensor]:
    """Each row's entries of per-step tables, shaped to broadcast against x, moved in one copy.

    Args:
        columns: K tables, each (S,) fp32 on the CPU.
        positions: (N,) each row's step index, on the CPU.
        x: (N, C, *S) the rows' latents (their device and rank).

    Returns:
        K tensors (N, 1, ...) on x's device.
    """
    rows = torch.stack([column[positions] for column in columns], dim=1).to(x.device)  # (N, K)
    shape = (-1, *([1] * (x.dim() - 1)))
    return [rows[:, k].reshape(shape) for k in range(len(columns))]
