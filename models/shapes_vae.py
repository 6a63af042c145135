"""The KL autoencoder architecture of the 32x32 shapes models: 32x32x3 pixels <-> 8x8x4 latents."""

from diffusers import AutoencoderKL

IMAGE_SIZE = 32  # pixels
LATENT_CHANNELS = 4
VAE_BLOCKS = (32, 64, 64)  # three blocks: two 2x downsamplings, 32 -> 8
NORM_GROUPS = 32


def build_shapes_vae() -> AutoencoderKL:
    """A freshly initialised autoencoder (about 0.95 M parameters)."""
    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * len(VAE_BLOCKS),
        up_block_types=("UpDecoderBlock2D",) * len(VAE_BLOCKS),
        block_out_channels=VAE_BLOCKS,
        latent_channels=LATENT_CHANNELS,
        norm_num_groups=NORM_GROUPS,
        sample_size=IMAGE_SIZE,
    )
