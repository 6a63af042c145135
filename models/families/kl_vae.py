"""Decoding through a 2D `AutoencoderKL` (DiT, PixArt, and the bundled space-time DiT frame by frame)."""

import torch
from diffusers import AutoencoderKL

from models.families.base import to_uint8

VAE_DECODE_CHUNK = 64  # frames decoded per VAE call, bounding activation memory for long videos


@torch.no_grad()
def decode_kl(vae: AutoencoderKL, latents: torch.Tensor) -> torch.Tensor:
    """Decode the way DiTPipeline and PixArtAlphaPipeline do: unscale, decode, [-1, 1] -> [0, 255], round.

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
    pixels = to_uint8(torch.cat(chunks))  # (N*F, H, W, 3)
    return pixels.reshape(n, f, *pixels.shape[1:]) if video else pixels
