"""The training code runs end to end at toy size and writes directories the service loads."""

from pathlib import Path

import pytest
import torch
from diffusers import DDPMScheduler, DiTPipeline

from models.loading import load_model
from models.training import shapes
from models.training.train import (
    Recipe,
    _diffusion_loss,
    _scheduler_kwargs,
    save_pipeline,
    train_image_dit,
    train_vae,
    train_video_dit,
)

pytestmark = pytest.mark.slow  # trains, benchmarks or starts processes: minutes in all

TINY = Recipe(steps=3, batch_size=4, learning_rate=1e-3, warmup_steps=1)


def test_a_few_steps_of_each_recipe_save_loadable_pipelines(tmp_path: Path) -> None:
    vae, vae_stats = train_vae(TINY)
    assert vae_stats["steps"] == 3 and vae.config.scaling_factor > 0
    image_dit, image_stats = train_image_dit(vae, TINY, hidden_heads=1, num_layers=1)
    video_dit, _ = train_video_dit(
        vae, Recipe(steps=1, batch_size=2, learning_rate=1e-3, warmup_steps=1), image_dit
    )
    assert image_stats["final_loss"] > 0

    save_pipeline(
        tmp_path / "img", image_dit, vae, shapes.image_labels(), video=False, record={"image": image_stats}
    )
    save_pipeline(tmp_path / "vid", video_dit, vae, shapes.video_labels(), video=True, record={})
    image = load_model("img", tmp_path / "img", torch.device("cpu"))
    video = load_model("vid", tmp_path / "vid", torch.device("cpu"))
    assert (image.kind, image.labels[0], image.null_class_id) == ("image", "red circle", 1000)
    assert (video.kind, video.max_frames, len(video.labels)) == ("video", 16, 96)
    assert DiTPipeline.from_pretrained(tmp_path / "img").get_label_ids(["blue square"]) == [9]


def test_label_dropout_happens_once_per_sample_not_per_block() -> None:
    vae, _ = train_vae(Recipe(steps=1, batch_size=2, learning_rate=1e-3, warmup_steps=1))
    model, _ = train_image_dit(vae, Recipe(steps=1, batch_size=2, learning_rate=1e-3, warmup_steps=1), 1, 1)
    embedders = [module.class_embedder for module in model.modules() if hasattr(module, "class_embedder")]
    assert embedders and all(embedder.dropout_prob == 0.0 for embedder in embedders)
    assert all(embedder.embedding_table.num_embeddings == 1001 for embedder in embedders)  # null row kept


def test_the_video_dit_starts_as_the_image_dit_on_every_frame() -> None:
    vae, _ = train_vae(Recipe(steps=1, batch_size=2, learning_rate=1e-3, warmup_steps=1))
    image_dit, _ = train_image_dit(vae, TINY, hidden_heads=1, num_layers=2)
    for module in image_dit.modules():  # make the image DiT non-trivial: adaLN-Zero starts at zero
        if isinstance(module, torch.nn.Linear):
            torch.nn.init.normal_(module.weight, std=0.1)
    video_dit, _ = train_video_dit(vae, Recipe(steps=0, batch_size=1, learning_rate=1e-3), image_dit)

    video = torch.randn(2, 4, 16, 8, 8)  # (N, C, F, H, W)
    timesteps, video_labels = (
        torch.tensor([700, 30]),
        torch.tensor([9 * 4 + 3, 1000]),
    )  # "blue square moving down"
    with torch.no_grad():
        out = video_dit(video, timesteps, video_labels).sample  # (2, 4, 16, 8, 8)
        frames = video.permute(0, 2, 1, 3, 4).reshape(32, 4, 8, 8)  # (N*F, C, H, W)
        per_frame = image_dit(
            frames,
            timestep=timesteps.repeat_interleave(16),
            class_labels=torch.tensor([9] * 16 + [1000] * 16),
        ).sample  # (N*F, C, H, W)
    expected = per_frame.reshape(2, 16, 4, 8, 8).permute(0, 2, 1, 3, 4)
    assert out.abs().max() > 0.1
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)
    # Each temporal block's conditioning starts as its spatial twin's plus one offset per direction,
    # shared by all stills: the still is known and the directions are apart from step 0.
    spatial_emb = video_dit.transformer_blocks[1].norm1.emb
    temporal_emb = video_dit.temporal_transformer_blocks[1].norm1.emb
    for (name, value), twin in zip(
        spatial_emb.timestep_embedder.state_dict().items(),
        temporal_emb.timestep_embedder.state_dict().values(),
        strict=True,
    ):
        assert torch.equal(value, twin), name
    spatial = spatial_emb.class_embedder.embedding_table.weight  # (1001, D)
    table = temporal_emb.class_embedder.embedding_table.weight  # (1001, D)
    offset = table[9 * 4 + 3] - spatial[9 * 4 + 3]  # "blue square moving down" minus "blue square"
    assert offset.norm() > 1.0
    torch.testing.assert_close(table[10 * 4 + 3] - spatial[10 * 4 + 3], offset)  # "blue triangle ... down"
    assert torch.equal(spatial[9 * 4], spatial[9 * 4 + 3])  # spatial blocks: still rows, exact start
    assert torch.equal(table[1000], spatial[1000])  # the null class has no direction


class _Oracle(torch.nn.Module):
    """Knows the clean latent z, so it can give the exact eps or v for any noisy input."""

    def __init__(self, z: torch.Tensor, scheduler: DDPMScheduler, target: str):
        super().__init__()
        self.z, self.scheduler, self.target = z, scheduler, target

    def forward(self, x_t: torch.Tensor, timestep: torch.Tensor, class_labels: torch.Tensor):
        alpha_bar = self.scheduler.alphas_cumprod[timestep].view(-1, 1, 1, 1)  # (N, 1, 1, 1)
        a, s = alpha_bar.sqrt(), (1 - alpha_bar).sqrt()
        eps = (x_t - a * self.z) / s
        out = eps if self.target == "epsilon" else a * eps - s * self.z  # v = a*eps - s*x0
        return type("Output", (), {"sample": out})()


def test_the_loss_targets_eps_or_v_as_the_recipe_says() -> None:
    scheduler, z = DDPMScheduler(**_scheduler_kwargs()), torch.randn(8, 4, 8, 8)
    for target in ("epsilon", "v_prediction"):
        for trained_for in ("epsilon", "v_prediction"):
            loss = _diffusion_loss(
                _Oracle(z, scheduler, target), scheduler, z, torch.zeros(8, dtype=torch.long),
                torch.Generator().manual_seed(0), prediction_type=trained_for,
            )  # fmt: skip
            assert (loss.item() < 1e-8) == (target == trained_for), (target, trained_for, loss.item())


def test_a_v_prediction_recipe_saves_a_v_prediction_scheduler(tmp_path: Path) -> None:
    vae, _ = train_vae(Recipe(steps=1, batch_size=2, learning_rate=1e-3, warmup_steps=1))
    recipe = Recipe(steps=1, batch_size=2, learning_rate=1e-3, warmup_steps=1, prediction_type="v_prediction")
    image_dit, _ = train_image_dit(vae, recipe, hidden_heads=1, num_layers=1)
    save_pipeline(
        tmp_path / "img", image_dit, vae, shapes.image_labels(), False, {}, prediction_type="v_prediction"
    )
    model = load_model("img", tmp_path / "img", torch.device("cpu"))
    assert model.scheduler.config.prediction_type == "v_prediction"


def test_an_ema_recipe_ships_the_moving_average_of_the_weights() -> None:
    def trained(steps: int, ema_decay: float | None) -> dict[str, torch.Tensor]:
        # Seeded throughout: the VAE's recipe seeds torch, so the DiT starts from the same weights each time.
        vae, _ = train_vae(Recipe(steps=1, batch_size=2, learning_rate=1e-3, warmup_steps=1))
        recipe = Recipe(steps=steps, batch_size=2, learning_rate=1e-2, warmup_steps=1, ema_decay=ema_decay)
        model, _ = train_image_dit(vae, recipe, hidden_heads=1, num_layers=1)
        return {key: value.clone() for key, value in model.state_dict().items()}

    start, raw, frozen = trained(0, None), trained(3, None), trained(3, ema_decay=1.0)
    assert [key for key in raw if not torch.equal(raw[key], start[key])]  # training moves the raw weights
    assert all(torch.equal(frozen[key], start[key]) for key in start)  # decay 1: the average never moves
