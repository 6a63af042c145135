"""The clean latent x0 that a denoising step's prediction points at (for previews)."""

import torch
from diffusers.schedulers.scheduling_utils import SchedulerMixin

FLOW_PREDICTION = "flow_prediction"


def predicted_clean(
    scheduler: SchedulerMixin, x: torch.Tensor, pred: torch.Tensor, t: torch.Tensor, step_index: int
) -> torch.Tensor:
    """The clean latent x0 that a prediction points at.

    Args:
        scheduler: the batch's scheduler (its config says what `pred` is).
        x: (N, C, *S) the latents the prediction was made from.
        pred: (N, C, *S) the guided model output.
        t: the step's timestep (scalar).
        step_index: which step of the schedule this is (flow-matching sigmas are indexed by it).

    Returns:
        (N, C, *S) fp32 predicted x0.
    """
    config = scheduler.config
    prediction_type = getattr(config, "prediction_type", "epsilon")
    x, pred = x.float(), pred.float()
    if prediction_type == FLOW_PREDICTION or not hasattr(scheduler, "alphas_cumprod"):
        # Flow matching: x_t = (1 - sigma) x0 + sigma eps and v = eps - x0, so x0 = x_t - sigma v.
        sigma = float(scheduler.sigmas[step_index])
        return x - sigma * pred
    alpha = float(scheduler.alphas_cumprod[int(t)])  # alpha-bar_t
    if prediction_type == "epsilon":
        return (x - (1 - alpha) ** 0.5 * pred) / alpha**0.5
    if prediction_type == "v_prediction":
        return alpha**0.5 * x - (1 - alpha) ** 0.5 * pred
    return pred  # "sample"
