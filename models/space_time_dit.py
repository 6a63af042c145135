"""Class-conditional video Diffusion Transformer with factorised space-time attention (Latte style).

Attention factorisation: Latte "variant 1", alternating blocks. Each of the ``num_layers`` block pairs is one
spatial block (self-attention over the T = (H/p)*(W/p) patch tokens of each frame) followed by one temporal
block (self-attention over the F frames at each spatial position). Full 3D attention over all F*T tokens costs
O((F*T)^2) per layer; the factorised pair costs O(F*T^2 + T*F^2), which is far cheaper for videos, while two
blocks still let every token reach every other token. Conditioning is DiT's adaLN-Zero on timestep + class
label (``BasicTransformerBlock(norm_type="ada_norm_zero")``); the null class ``num_embeds_ada_norm`` is the
unconditional label used for classifier-free guidance.
"""

import torch
import torch.nn.functional as F
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.attention import BasicTransformerBlock
from diffusers.models.embeddings import PatchEmbed, get_1d_sincos_pos_embed_from_grid
from diffusers.models.modeling_outputs import Transformer2DModelOutput
from diffusers.models.modeling_utils import ModelMixin
from torch import nn

ACTIVATION_FN = "gelu-approximate"  # DiT's MLP activation
OUT_NORM_EPS = 1e-6  # eps of the final LayerNorm, as DiT


class SpaceTimeDiTModel(ModelMixin, ConfigMixin):
    """Latte-style video DiT: alternating spatial/temporal adaLN-Zero blocks, conditioned on (t, class)."""

    _skip_layerwise_casting_patterns = ["pos_embed", "norm"]

    @register_to_config
    def __init__(
        self,
        sample_size: int = 8,
        num_frames: int = 16,
        patch_size: int = 1,
        in_channels: int = 4,
        out_channels: int | None = None,
        num_layers: int = 4,
        num_attention_heads: int = 4,
        attention_head_dim: int = 32,
        num_embeds_ada_norm: int = 1000,
        norm_eps: float = 1e-5,
        dropout: float = 0.0,
    ):
        super().__init__()
        self.inner_dim = num_attention_heads * attention_head_dim
        self.out_channels = in_channels if out_channels is None else out_channels
        self.pos_embed = PatchEmbed(
            height=sample_size,
            width=sample_size,
            patch_size=patch_size,
            in_channels=in_channels,
            embed_dim=self.inner_dim,
        )

        def make_block() -> BasicTransformerBlock:
            block = BasicTransformerBlock(
                self.inner_dim,
                num_attention_heads,
                attention_head_dim,
                dropout=dropout,
                activation_fn=ACTIVATION_FN,
                num_embeds_ada_norm=num_embeds_ada_norm,
                attention_bias=True,
                norm_type="ada_norm_zero",
                norm_elementwise_affine=False,
                norm_eps=norm_eps,
            )
            # The table keeps its null-class row (diffusers adds it when dropout_prob > 0), but no block
            # drops labels itself: blocks see per-frame/per-position copies of the labels, and a label
            # dropped in some copies only would be nonsense. Training drops whole samples' labels instead.
            block.norm1.emb.class_embedder.dropout_prob = 0.0
            return block

        self.transformer_blocks = nn.ModuleList([make_block() for _ in range(num_layers)])
        self.temporal_transformer_blocks = nn.ModuleList([make_block() for _ in range(num_layers)])
        # Marks the end of the block stack, back in the spatial layout (no weights): step caching
        # (worker/step_cache.py) reads the stack's result here, in the layout of its input.
        self.stack_exit = nn.Identity()

        frame_positions = torch.arange(num_frames, dtype=torch.float32)  # (F_max,)
        temp_pos_embed = get_1d_sincos_pos_embed_from_grid(self.inner_dim, frame_positions)  # (F_max, D)
        self.register_buffer("temp_pos_embed", temp_pos_embed.float().unsqueeze(0), persistent=False)

        self.norm_out = nn.LayerNorm(self.inner_dim, elementwise_affine=False, eps=OUT_NORM_EPS)
        self.proj_out_1 = nn.Linear(self.inner_dim, 2 * self.inner_dim)
        self.proj_out_2 = nn.Linear(self.inner_dim, patch_size * patch_size * self.out_channels)
        self._zero_init()

    def block_stack(self) -> tuple[list[nn.Module], nn.Module]:
        """The blocks in call order (spatial, temporal, spatial, ...) and the stack's exit marker."""
        pairs = zip(self.transformer_blocks, self.temporal_transformer_blocks, strict=True)
        return [block for pair in pairs for block in pair], self.stack_exit

    def _zero_init(self) -> None:
        """adaLN-Zero as in the DiT paper: zero every block's modulation and the final layer."""
        blocks = [*self.transformer_blocks, *self.temporal_transformer_blocks]
        for layer in [*(block.norm1.linear for block in blocks), self.proj_out_1, self.proj_out_2]:
            nn.init.zeros_(layer.weight)
            nn.init.zeros_(layer.bias)

    def forward(
        self,
        hidden_states: torch.Tensor,
        timestep: torch.Tensor | float | int,
        class_labels: torch.LongTensor,
        return_dict: bool = True,
    ) -> Transformer2DModelOutput | tuple[torch.Tensor]:
        """Predict noise (and, when out_channels = 2*in_channels, variance) for a batch of latent videos.

        Args:
            hidden_states: latent video, shape (N, C, F, H, W), 1 <= F <= num_frames, H and W divisible by
                patch_size.
            timestep: diffusion timestep per sample, shape (N,), or a scalar used for every sample.
            class_labels: class ids, shape (N,), long, in [0, num_embeds_ada_norm]; the last id is the
                null (unconditional) class.
            return_dict: return a Transformer2DModelOutput rather than a tuple.

        Returns:
            Transformer2DModelOutput whose ``sample`` has shape (N, out_channels, F, H, W), or ``(sample,)``.
        """
        n, c, f, h, w = hidden_states.shape
        p, c_out, d = self.config.patch_size, self.out_channels, self.inner_dim
        if not 1 <= f <= self.config.num_frames:
            raise ValueError(f"got {f} frames, expected 1..{self.config.num_frames}")
        if h % p or w % p:
            raise ValueError(f"H={h} and W={w} must be divisible by patch_size={p}")
        hp, wp = h // p, w // p
        device = hidden_states.device

        timestep = torch.as_tensor(timestep, device=device)  # (N,) or ()
        if timestep.ndim == 0:
            timestep = timestep.expand(n)  # (N,)
        class_labels = class_labels.to(device)  # (N,)

        x = hidden_states.permute(0, 2, 1, 3, 4).reshape(n * f, c, h, w)  # (N*F, C, H, W)
        x = self.pos_embed(x)  # (N*F, T, D), T = (H/p)*(W/p), 2D sincos added
        t = x.shape[1]
        t_spatial, y_spatial = timestep.repeat_interleave(f), class_labels.repeat_interleave(f)  # (N*F,)
        t_temporal, y_temporal = timestep.repeat_interleave(t), class_labels.repeat_interleave(t)  # (N*T,)

        frame_pos = self.temp_pos_embed[:, :f].to(x.dtype)  # (1, F, D)
        block_pairs = zip(self.transformer_blocks, self.temporal_transformer_blocks, strict=True)
        for spatial, temporal in block_pairs:
            x = spatial(x, timestep=t_spatial, class_labels=y_spatial)  # (N*F, T, D)
            x = x.reshape(n, f, t, d).transpose(1, 2).reshape(n * t, f, d)  # (N*T, F, D)
            # The frame position is an input of every temporal block but is not left in the residual
            # stream, so spatial blocks see what an image DiT sees (and an image DiT can initialise them).
            x = temporal(x + frame_pos, timestep=t_temporal, class_labels=y_temporal)  # (N*T, F, D)
            x = x - frame_pos  # (N*T, F, D)
            x = x.reshape(n, t, f, d).transpose(1, 2).reshape(n * f, t, d)  # (N*F, T, D)
        x = self.stack_exit(x)  # (N*F, T, D)

        emb = self.transformer_blocks[0].norm1.emb(timestep, class_labels, hidden_dtype=x.dtype)  # (N, D)
        shift, scale = self.proj_out_1(F.silu(emb)).repeat_interleave(f, dim=0).chunk(2, dim=1)  # (N*F, D)
        x = self.norm_out(x) * (1 + scale[:, None]) + shift[:, None]  # (N*F, T, D)
        x = self.proj_out_2(x)  # (N*F, T, p*p*C_out)

        x = x.reshape(n, f, hp, wp, p, p, c_out)  # (N, F, H/p, W/p, p, p, C_out)
        x = torch.einsum("nfhwpqc->ncfhpwq", x)  # (N, C_out, F, H/p, p, W/p, p)
        output = x.reshape(n, c_out, f, h, w)  # (N, C_out, F, H, W)

        if not return_dict:
            return (output,)
        return Transformer2DModelOutput(sample=output)
