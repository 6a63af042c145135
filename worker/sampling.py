"""Batched DiT sampling with classifier-free guidance, as small pure functions over tensors.

No Redis, settings or I/O here: the worker passes tensors, a scheduler and generators in, and gets
tensors back. Each row of a batch is one output with its own seed, condition and guidance scale, and
depends only on those, never on which other rows share its batch. What differs between DiT families
(how conditions become inputs, learned sigma, decoding) is the family adapter's (models/families).
"""

from collections.abc import Callable
from functools import partial

import torch
from diffusers.schedulers.scheduling_utils import SchedulerMixin

from models.families.base import Conditioning, LoadedModel, RowCondition
from worker.clean import predicted_clean
from worker.lora import RowAdapters, adapters_context
from worker.stages import CONDITIONS, DECODE, SAMPLING, StageTimer, untimed
from worker.step_cache import RowCaches, StepCache, planned, step_cache

# predict(x, t, cond) -> prediction on the latent channels; x (B, C, *S), t (B,) -> (B, C, *S)
PredictFn = Callable[[torch.Tensor, torch.Tensor, Conditioning], torch.Tensor]
# on_step(steps_done, total_steps, rows) -> bool mask over the live rows to keep, or None to keep all
StepCallback = Callable[[int, int, torch.Tensor], torch.Tensor | None]
# on_clean(steps_done, rows, clean): called after every step, before on_step; clean() computes the
# live rows' predicted clean latents (M, C, *S), for previews: only when the callback asks for them.
CleanCallback = Callable[[int, torch.Tensor, Callable[[], torch.Tensor]], None]

NO_GUIDANCE_AT_OR_BELOW = 1.0  # the pipelines apply CFG only when guidance_scale > 1


def initial_noise(
    generators: list[torch.Generator], shape: tuple[int, ...], device: torch.device
) -> torch.Tensor:
    """Draw each row's starting latent from its own generator.

    Drawn in fp32 on the generators' device (CPU) and then moved, so a seed gives the same noise on
    any device, and the same noise as a diffusers pipeline with a CPU generator seeded alike.

    Returns:
        (N, *shape) fp32 latents, N = len(generators).
    """
    rows = [torch.randn((1, *shape), generator=generator, dtype=torch.float32) for generator in generators]
    return torch.cat(rows).to(device)  # (N, *shape)


def guided_rows(guidance_scale: torch.Tensor) -> torch.Tensor:
    """(G,) indices of the rows that get CFG. Computed once per batch: `nonzero` waits for the GPU."""
    return (guidance_scale > NO_GUIDANCE_AT_OR_BELOW).nonzero().squeeze(1)


def select_rows(cond: Conditioning, rows: torch.Tensor) -> Conditioning:
    return {key: value[rows.to(value.device)] for key, value in cond.items()}


def cfg_denoise(
    predict: PredictFn,
    x: torch.Tensor,
    t: torch.Tensor,
    cond: Conditioning,
    uncond: Conditioning,
    guidance_scale: torch.Tensor,
    guided: torch.Tensor | None = None,
) -> torch.Tensor:
    """One guided prediction for a batch with per-row guidance scales.

    Rows with guidance_scale > 1 get an extra unconditional row in the same forward pass;
    pred = uncond + s * (cond - uncond) on their own rows only.

    Args:
        predict: the family's transformer call.
        x: (N, C, *S) latents, S = (H, W) for images or (F, H, W) for videos.
        t: (N,) timesteps.
        cond: each row's conditional inputs, every value (N, ...).
        uncond: each row's unconditional inputs, same keys and shapes.
        guidance_scale: (N,) CFG scales.
        guided: guided_rows(guidance_scale), when the caller has it already.

    Returns:
        (N, C, *S) prediction.
    """
    n = x.shape[0]
    guided = guided_rows(guidance_scale) if guided is None else guided  # (G,)
    x_in = torch.cat([x, x[guided]])  # (N+G, C, *S)
    t_in = torch.cat([t, t[guided]])  # (N+G,)
    inputs = {key: torch.cat([cond[key], uncond[key][guided.to(cond[key].device)]]) for key in cond}
    out = predict(x_in, t_in, inputs)  # (N+G, C, *S)
    pred_cond, pred_uncond = out[:n], out[n:]  # (N, C, *S), (G, C, *S)
    if guided.numel() == 0:
        return pred_cond
    scale = guidance_scale[guided].to(out.dtype).view(-1, *([1] * (x.dim() - 1)))  # (G, 1, ...)
    pred = pred_cond.clone()
    pred[guided] = pred_uncond + scale * (pred_cond[guided] - pred_uncond)
    return pred


def filter_scheduler_state(scheduler: SchedulerMixin, keep: torch.Tensor, batch_size: int) -> None:
    """Drop rows from a scheduler's per-batch state (multistep solvers keep past model outputs)."""
    for name, value in vars(scheduler).items():
        if isinstance(value, torch.Tensor) and value.dim() > 0 and value.shape[0] == batch_size:
            setattr(scheduler, name, value[keep])
        elif isinstance(value, list) and any(isinstance(item, torch.Tensor) for item in value):
            setattr(
                scheduler,
                name,
                [
                    item[keep] if isinstance(item, torch.Tensor) and item.shape[:1] == (batch_size,) else item
                    for item in value
                ],
            )


def sample(
    predict: PredictFn,
    scheduler: SchedulerMixin,
    latents: torch.Tensor,
    cond: Conditioning,
    uncond: Conditioning,
    guidance_scale: torch.Tensor,
    num_inference_steps: int,
    on_step: StepCallback | None = None,
    on_clean: CleanCallback | None = None,
    cache: StepCache | None = None,
    caches: RowCaches | None = None,
    adapters: RowAdapters | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Run the whole denoising loop for a batch.

    Args:
        predict: the family's transformer call.
        scheduler: a fresh scheduler (it is set up and stepped here).
        latents: (N, C, *S) initial noise.
        cond: each row's conditional inputs, every value (N, ...).
        uncond: each row's unconditional inputs.
        guidance_scale: (N,) CFG scales.
        num_inference_steps: denoising steps.
        on_step: called after every step; returns which live rows go on (canceled rows leave).
        on_clean: called after every step with a way to get the predicted clean latents.
        cache: the model's step cache, and `caches` the rows' (by input index): rows with a policy may
            reuse their block residuals (worker/step_cache.py).
        adapters: each input row's LoRA adapter (worker/lora.py); None: the base model for all.

    Returns:
        (M, C, *S) denoised latents of the rows that finished, and (M,) their indices into the input.
    """
    # Timesteps stay on the CPU, as DiTPipeline keeps them: schedulers index their CPU tables with
    # them and branch on them, which with GPU timesteps costs a device-to-host sync every step.
    scheduler.set_timesteps(num_inference_steps)
    timesteps = scheduler.timesteps
    rows = torch.arange(latents.shape[0])  # (M,) input index of each live row
    guided = guided_rows(guidance_scale)  # (G,)
    for step, t in enumerate(timesteps):
        x = scheduler.scale_model_input(latents, t)  # (M, C, *S)
        t_rows = t.reshape(1).expand(x.shape[0]).to(x.device)  # (M,)
        live = rows.tolist()
        with (
            planned(cache, caches, live, guided, [step] * len(live), len(timesteps)),
            adapters_context(adapters, live, guided),
        ):
            pred = cfg_denoise(predict, x, t_rows, cond, uncond, guidance_scale, guided)
        out = scheduler.step(pred, t, latents)
        if on_clean is not None:
            on_clean(step + 1, rows, partial(_clean, scheduler, out, latents, pred, t, step))
        latents = out.prev_sample  # (M, C, *S)
        keep = on_step(step + 1, len(timesteps), rows) if on_step else None
        if keep is not None and not bool(keep.all()):
            filter_scheduler_state(scheduler, keep.to(latents.device), latents.shape[0])
            latents, cond, uncond = latents[keep], select_rows(cond, keep), select_rows(uncond, keep)
            guidance_scale, rows = guidance_scale[keep], rows[keep.cpu()]
            guided = guided_rows(guidance_scale)
            if rows.numel() == 0:
                break
    return latents, rows


def _clean(
    scheduler: SchedulerMixin, out: object, x: torch.Tensor, pred: torch.Tensor, t: torch.Tensor, step: int
) -> torch.Tensor:
    """The step's predicted clean latents: the scheduler's own (DDIM gives them) or computed."""
    given = getattr(out, "pred_original_sample", None)
    return given if isinstance(given, torch.Tensor) else predicted_clean(scheduler, x, pred, t, step)


@torch.no_grad()
def generate(
    model: LoadedModel,
    conditions: list[RowCondition],
    seeds: list[int],
    guidance_scales: list[float],
    num_inference_steps: int,
    width: int,
    height: int,
    frames: int = 1,
    scheduler: SchedulerMixin | None = None,
    on_step: StepCallback | None = None,
    timer: StageTimer = untimed,
    on_clean: CleanCallback | None = None,
    caches: RowCaches | None = None,
    adapters: RowAdapters | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Noise, conditions, the guided loop and decoding for one batch of rows of one model.

    `timer` wraps each stage (conditions, sampling, decode), for the worker's metrics. `caches` holds
    the rows' step-caching policies (RowCaches.of), and after the call what they skipped; `adapters` their
    LoRA adapters (worker/lora.py).

    Returns:
        (M, H, W, 3) or (M, F, H, W, 3) uint8 pixels of the rows that finished, and (M,) their indices.
    """
    generators = [torch.Generator().manual_seed(seed) for seed in seeds]
    latents = initial_noise(generators, model.latent_shape(width, height, frames), model.device)
    with timer(CONDITIONS):
        cond, uncond = model.conditions(conditions)
    guidance = torch.tensor(guidance_scales, dtype=torch.float32, device=model.device)  # (N,)
    with timer(SAMPLING):
        latents, rows = sample(
            model.predict,
            scheduler or model.new_scheduler(),
            latents,
            cond,
            uncond,
            guidance,
            num_inference_steps,
            on_step,
            on_clean,
            step_cache(model) if caches else None,
            caches,
            adapters,
        )
    if rows.numel() == 0:
        return torch.empty(0, dtype=torch.uint8), rows
    with timer(DECODE):
        return model.decode(latents), rows
