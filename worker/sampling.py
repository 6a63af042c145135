"""Batched DiT sampling with classifier-free guidance, as small pure functions over tensors.

No Redis, settings or I/O here: the worker passes tensors, a scheduler and generators in, and gets
tensors back. Each row of a batch is one output with its own seed, class label and guidance scale,
and depends only on those, never on which other rows share its batch.
"""

from collections.abc import Callable

import torch
from diffusers import AutoencoderKL
from diffusers.schedulers.scheduling_utils import SchedulerMixin

# model_fn(x, t, y) -> the transformer's raw output; x (B, C, *S), t (B,), y (B,) -> (B, C_out, *S)
ModelFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]
# on_step(steps_done, total_steps, rows) -> bool mask over the live rows to keep, or None to keep all
StepCallback = Callable[[int, int, torch.Tensor], torch.Tensor | None]

NO_GUIDANCE_AT_OR_BELOW = 1.0  # DiTPipeline applies CFG only when guidance_scale > 1
VAE_DECODE_CHUNK = 64  # frames decoded per VAE call, bounding activation memory for long videos


def initial_noise(
    generators: list[torch.Generator], shape: tuple[int, ...], device: torch.device, dtype: torch.dtype
) -> torch.Tensor:
    """Draw each row's starting latent from its own generator.

    Drawn in fp32 on the generators' device (CPU) and then moved, so a seed gives the same noise on
    any device and dtype, and the same noise as `DiTPipeline` with a CPU generator seeded alike.

    Returns:
        (N, *shape) latents, N = len(generators).
    """
    rows = [torch.randn((1, *shape), generator=generator, dtype=torch.float32) for generator in generators]
    return torch.cat(rows).to(device=device, dtype=dtype)  # (N, *shape)


def cfg_denoise(
    model_fn: ModelFn,
    x: torch.Tensor,
    t: torch.Tensor,
    class_labels: torch.Tensor,
    guidance_scale: torch.Tensor,
    null_class_id: int,
    latent_channels: int,
) -> torch.Tensor:
    """One guided noise prediction for a batch with per-row guidance scales.

    Rows with guidance_scale > 1 get an extra unconditional row (class `null_class_id`) in the same
    forward pass; eps = eps_uncond + s * (eps_cond - eps_uncond) on their own rows only. Learned-sigma
    channels (DiT's out_channels = 2 * in_channels) are dropped, as DiTPipeline does.

    Args:
        model_fn: the transformer as (x, t, y) -> output.
        x: (N, C, *S) latents, S = (H, W) for images or (F, H, W) for videos.
        t: (N,) timesteps.
        class_labels: (N,) class ids.
        guidance_scale: (N,) CFG scales.
        null_class_id: the class id DiT was trained to read as "no class".
        latent_channels: C.

    Returns:
        (N, C, *S) noise prediction.
    """
    n = x.shape[0]
    guided = (guidance_scale > NO_GUIDANCE_AT_OR_BELOW).nonzero().squeeze(1)  # (G,)
    x_in = torch.cat([x, x[guided]])  # (N+G, C, *S)
    t_in = torch.cat([t, t[guided]])  # (N+G,)
    y_in = torch.cat([class_labels, torch.full_like(class_labels[guided], null_class_id)])  # (N+G,)
    out = model_fn(x_in, t_in, y_in)[:, :latent_channels]  # (N+G, C, *S), learned sigma dropped
    eps_cond, eps_uncond = out[:n], out[n:]  # (N, C, *S), (G, C, *S)
    if guided.numel() == 0:
        return eps_cond
    scale = guidance_scale[guided].to(out.dtype).view(-1, *([1] * (x.dim() - 1)))  # (G, 1, ...)
    eps = eps_cond.clone()
    eps[guided] = eps_uncond + scale * (eps_cond[guided] - eps_uncond)
    return eps


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
    model_fn: ModelFn,
    scheduler: SchedulerMixin,
    latents: torch.Tensor,
    class_labels: torch.Tensor,
    guidance_scale: torch.Tensor,
    num_inference_steps: int,
    null_class_id: int,
    on_step: StepCallback | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Run the whole denoising loop for a batch.

    Args:
        model_fn: the transformer as (x, t, y) -> output.
        scheduler: a fresh scheduler (it is set up and stepped here).
        latents: (N, C, *S) initial noise.
        class_labels: (N,) class ids.
        guidance_scale: (N,) CFG scales.
        num_inference_steps: denoising steps.
        null_class_id: the unconditional class id.
        on_step: called after every step; returns which live rows go on (canceled rows leave).

    Returns:
        (M, C, *S) denoised latents of the rows that finished, and (M,) their indices into the input.
    """
    scheduler.set_timesteps(num_inference_steps, device=latents.device)
    timesteps = scheduler.timesteps
    rows = torch.arange(latents.shape[0])  # (M,) input index of each live row
    latent_channels = latents.shape[1]
    for step, t in enumerate(timesteps):
        x = scheduler.scale_model_input(latents, t)  # (M, C, *S)
        t_rows = t.reshape(1).expand(x.shape[0]).to(x.device)  # (M,)
        eps = cfg_denoise(model_fn, x, t_rows, class_labels, guidance_scale, null_class_id, latent_channels)
        latents = scheduler.step(eps, t, latents).prev_sample  # (M, C, *S)
        keep = on_step(step + 1, len(timesteps), rows) if on_step else None
        if keep is not None and not bool(keep.all()):
            filter_scheduler_state(scheduler, keep.to(latents.device), latents.shape[0])
            latents, class_labels = latents[keep], class_labels[keep]
            guidance_scale, rows = guidance_scale[keep], rows[keep.cpu()]
            if rows.numel() == 0:
                break
    return latents, rows


@torch.no_grad()
def decode_latents(vae: AutoencoderKL, latents: torch.Tensor) -> torch.Tensor:
    """Decode latents to 8-bit RGB the way DiTPipeline does (scale, decode, [-1, 1] -> [0, 255], round).

    Args:
        vae: the model's VAE.
        latents: (N, C, h, w) image latents or (N, C, F, h, w) video latents, decoded frame by frame.

    Returns:
        (N, H, W, 3) or (N, F, H, W, 3) uint8 on the CPU.
    """
    video = latents.dim() == 5
    if video:
        n, c, f, h, w = latents.shape
        latents = latents.permute(0, 2, 1, 3, 4).reshape(n * f, c, h, w)  # (N*F, C, h, w)
    latents = latents / vae.config.scaling_factor
    chunks = [vae.decode(chunk.to(vae.dtype)).sample for chunk in latents.split(VAE_DECODE_CHUNK)]
    images = (torch.cat(chunks).float() / 2 + 0.5).clamp(0, 1)  # (N*F, 3, H, W)
    pixels = (images.permute(0, 2, 3, 1).cpu() * 255).round().to(torch.uint8)  # (N*F, H, W, 3)
    return pixels.reshape(n, f, *pixels.shape[1:]) if video else pixels
