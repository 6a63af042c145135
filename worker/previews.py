"""Previews: a cheap picture of where each row is heading, taken during denoising.

The sampler gives each step's predicted clean latent x0 (worker/clean.py); `LatentRGB` maps its
latent channels to RGB
with one affine map per model, as ComfyUI's "latent2rgb" previews do, instead of running the VAE
decoder (for large models it costs more than a transformer step). The map is fitted, once per model
and worker, by least squares between latents the model itself sampled and their decoded colours
averaged over each latent cell; so it needs no per-family table and follows any checkpoint. (Fitted
on decoded random latents, or on the encodings of synthetic colour fields, it turned the bundled
model's red shapes blue or grey: a small VAE is far from linear off its data.)
"""

import base64
import io
import logging
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from PIL import Image

from dit_serve.contract import ConditioningKind, JobRequest
from dit_serve.events import PreviewEvent
from models.families.base import LoadedModel, RowCondition
from worker.sampling import initial_noise, sample

log = logging.getLogger(__name__)

FIT_SAMPLES = 4  # rows the model samples to fit its map, once per worker
FIT_STEPS = 6
FIT_SEED = 0
PREVIEW_MAX_SIDE = 256  # previews are upscaled to the output size, at most this many pixels a side


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


def fit_latent_rgb(model: LoadedModel, width: int, height: int) -> LatentRGB:
    """Fit `model`'s latent-to-RGB map on its own samples: FIT_SAMPLES rows of width x height and
    FIT_STEPS steps, one frame (class models: every class in turn; text models: the empty prompt), each
    final latent against its decoded colours averaged over each latent cell."""
    spec = model.spec()
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
    """A worker's latent-to-RGB maps, fitted on first use per model, and the preview events they make."""

    def __init__(self) -> None:
        self._maps: dict[str, LatentRGB] = {}

    def events(
        self,
        model: LoadedModel,
        outputs: Sequence[tuple[str, int]],
        clean: torch.Tensor,
        steps_done: int,
        request: JobRequest,
    ) -> list[PreviewEvent]:
        """One preview event per (job id, output index) of `outputs`, from its row of `clean`
        (M, C, *S); none if previews fail (a preview is never worth failing a batch for)."""
        try:
            if model.name not in self._maps:
                # Fitted at this request's size: every size the model serves samples alike per cell.
                self._maps[model.name] = fit_latent_rgb(model, request.width, request.height)
            cells = self._maps[model.name](clean)  # (M, h, w, 3)
            events = []
            for (job_id, index), row in zip(outputs, cells, strict=True):
                image, width, height = png_b64(row, request.width, request.height)
                events.append(
                    PreviewEvent(
                        id=job_id,
                        step=steps_done,
                        steps=request.num_inference_steps,
                        index=index,
                        width=width,
                        height=height,
                        b64_json=image,
                    )
                )
            return events
        except Exception:
            log.exception("previews of model %s failed; the batch goes on without them", model.name)
            return []


def previews_due(request: JobRequest, steps_done: int, steps: int) -> bool:
    """Whether a job wants a preview after `steps_done` steps: every `previews` steps, but not after
    the last (the output itself follows)."""
    return request.previews is not None and steps_done % request.previews == 0 and steps_done < steps
