"""Previews: a cheap picture of where each row is heading, taken during denoising.

Two pure steps. `predicted_clean` turns a step's prediction into the predicted clean latent x0 (the
scheduler's own `pred_original_sample` where it gives one). `LatentRGB` maps latent channels to RGB
with one affine map per model, as ComfyUI's "latent2rgb" previews do, instead of running the VAE
decoder (for large models it costs more than a transformer step). The map is fitted, once per model
and worker, by least squares between latents the model itself sampled and their decoded colours
averaged over each latent cell; so it needs no per-family table and follows any checkpoint. (Fitted
on decoded random latents, or on the encodings of synthetic colour fields, it turned the bundled
model's red shapes blue or grey: a small VAE is far from linear off its data.)
"""

import base64
import io
from dataclasses import dataclass

import torch
from diffusers.schedulers.scheduling_utils import SchedulerMixin
from PIL import Image

from dit_serve.contract import ConditioningKind
from models.families.base import LoadedModel, RowCondition
from worker.sampling import initial_noise, sample

FIT_SAMPLES = 4  # rows the model samples to fit its map, once per worker
FIT_STEPS = 6
FIT_SEED = 0
PREVIEW_MAX_SIDE = 256  # previews are upscaled to the output size, at most this many pixels a side
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


@dataclass(frozen=True)
class LatentRGB:
    """An affine map from latent channels to RGB in [0, 1]."""

    weight: torch.Tensor  # (C, 3)
    bias: torch.Tensor  # (3,)

    def __call__(self, latents: torch.Tensor) -> torch.Tensor:
        """(N, C, h, w) or (N, C, f, h, w) latents (videos: the first latent frame) to (N, h, w, 3) uint8."""
        if latents.dim() == 5:
            latents = latents[:, :, 0]  # (N, C, h, w)
        cells = latents.float().cpu().movedim(1, -1)  # (N, h, w, C)
        rgb = (cells @ self.weight + self.bias).clamp(0, 1)  # (N, h, w, 3)
        return (rgb * 255).round().to(torch.uint8)


def fit_latent_rgb(model: LoadedModel) -> LatentRGB:
    """Fit `model`'s latent-to-RGB map on its own samples: FIT_SAMPLES rows at its default size and
    FIT_STEPS steps, one frame (class models: every class in turn; text models: the empty prompt), each
    final latent against its decoded colours averaged over each latent cell."""
    spec = model.spec()
    width, height = (int(side) for side in spec.default_size.split("x"))
    if model.conditioning is ConditioningKind.CLASS:
        conditions = [RowCondition(class_label=k % (spec.num_classes or 1)) for k in range(FIT_SAMPLES)]
    else:
        conditions = [RowCondition(prompt="") for _ in range(FIT_SAMPLES)]
    generators = [torch.Generator().manual_seed(FIT_SEED + k) for k in range(FIT_SAMPLES)]
    with torch.no_grad():
        noise = initial_noise(generators, model.latent_shape(width, height, 1), model.device)
        cond, uncond = model.conditions(conditions)
        guidance = torch.full((FIT_SAMPLES,), spec.defaults.guidance_scale, device=model.device)
        latents, _ = sample(model.predict, model.new_scheduler(), noise, cond, uncond, guidance, FIT_STEPS)
        pixels = model.decode(latents)  # (N, H, W, 3) or (N, F, H, W, 3) uint8
    if latents.dim() == 5:
        latents, pixels = latents[:, :, 0], pixels[:, 0]  # the first frame
    scale = pixels.shape[1] // latents.shape[-2]  # pixels per latent cell, per side
    cell_rgb = torch.nn.functional.avg_pool2d(pixels.movedim(-1, 1).float() / 255, scale).movedim(1, -1)
    cells = latents.float().cpu().movedim(1, -1).reshape(-1, latents.shape[1])  # (N*h*w, C)
    design = torch.cat([cells, torch.ones(cells.shape[0], 1)], dim=1)  # (N*h*w, C + 1)
    solution = torch.linalg.lstsq(design, cell_rgb.reshape(-1, 3)).solution  # (C + 1, 3)
    return LatentRGB(weight=solution[:-1], bias=solution[-1])


def png_b64(cells: torch.Tensor, width: int, height: int) -> tuple[str, int, int]:
    """One preview, (h, w, 3) uint8 latent cells, as a base64 PNG upscaled towards the output size
    (at most PREVIEW_MAX_SIDE a side); returns it with its width and height."""
    shrink = max(width, height) / PREVIEW_MAX_SIDE
    size = (width, height) if shrink <= 1 else (round(width / shrink), round(height / shrink))
    image = Image.fromarray(cells.numpy()).resize(size, Image.Resampling.BILINEAR)
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode(), size[0], size[1]


class Previewer:
    """A worker's latent-to-RGB maps, fitted on first use per model."""

    def __init__(self) -> None:
        self._maps: dict[str, LatentRGB] = {}

    def images(self, model: LoadedModel, clean: torch.Tensor, width: int, height: int) -> list[tuple[str, int, int]]:
        """Each row of `clean` (M, C, *S) as a base64 PNG preview with its width and height."""
        if model.name not in self._maps:
            self._maps[model.name] = fit_latent_rgb(model)
        latent_rgb = self._maps[model.name]
        return [png_b64(cells, width, height) for cells in latent_rgb(clean)]
