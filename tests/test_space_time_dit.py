"""Tests for models.space_time_dit.SpaceTimeDiTModel (CPU, tiny config)."""

import pytest
import torch

from models.space_time_dit import SpaceTimeDiTModel

TINY = dict(
    sample_size=4,
    num_frames=4,
    patch_size=2,
    in_channels=4,
    num_layers=1,
    num_attention_heads=2,
    attention_head_dim=8,
    num_embeds_ada_norm=10,
)
BATCH = 3
WEIGHT_STD = 0.2  # outputs stay O(1) while randomised blocks visibly mix tokens


def make_model(randomise: bool = True, seed: int = 0, **overrides) -> SpaceTimeDiTModel:
    torch.manual_seed(seed)
    model = SpaceTimeDiTModel(**{**TINY, **overrides}).eval()
    if randomise:  # the adaLN-Zero init makes the output identically zero; replace every weight
        with torch.no_grad():
            for param in model.parameters():
                param.normal_(0.0, WEIGHT_STD)
    return model


def make_inputs(num_frames: int = TINY["num_frames"], batch: int = BATCH, seed: int = 1):
    gen = torch.Generator().manual_seed(seed)
    size = TINY["sample_size"]
    x = torch.randn(batch, TINY["in_channels"], num_frames, size, size, generator=gen)  # (N, C, F, H, W)
    t = torch.randint(0, 1000, (batch,), generator=gen)  # (N,)
    y = torch.randint(0, TINY["num_embeds_ada_norm"], (batch,), generator=gen)  # (N,)
    return x, t, y


@torch.no_grad()
def run(model: SpaceTimeDiTModel, x, t, y) -> torch.Tensor:
    return model(x, t, y).sample


def test_zero_init_output_is_zero():
    model = make_model(randomise=False)
    x, t, y = make_inputs()
    out = run(model, x, t, y)
    assert torch.count_nonzero(out) == 0


@pytest.mark.parametrize("patch_size", [1, 2])
@pytest.mark.parametrize("num_frames", [TINY["num_frames"], 1, 2])
def test_output_shape(num_frames, patch_size):
    model = make_model(patch_size=patch_size)
    x, t, y = make_inputs(num_frames=num_frames)
    out = run(model, x, t, y)
    assert out.shape == x.shape
    assert torch.isfinite(out).all()


def test_learned_sigma_shape_and_tuple_return():
    model = make_model(out_channels=2 * TINY["in_channels"])
    x, t, y = make_inputs(num_frames=3)
    with torch.no_grad():
        (out,) = model(x, t, y, return_dict=False)
    n, c, f, h, w = x.shape
    assert out.shape == (n, 2 * c, f, h, w)


def test_scalar_timestep_broadcasts():
    model = make_model()
    x, _, y = make_inputs()
    t_scalar = 500
    expected = run(model, x, torch.full((BATCH,), t_scalar), y)
    torch.testing.assert_close(run(model, x, t_scalar, y), expected)


def test_too_many_frames_rejected():
    model = make_model()
    x, t, y = make_inputs(num_frames=TINY["num_frames"] + 1)
    with pytest.raises(ValueError, match="frames"):
        run(model, x, t, y)


def test_save_and_load_roundtrip(tmp_path):
    model = make_model()
    model.save_pretrained(tmp_path, safe_serialization=True)
    assert (tmp_path / "diffusion_pytorch_model.safetensors").is_file()
    loaded = SpaceTimeDiTModel.from_pretrained(tmp_path).eval()
    assert loaded.config.num_frames == TINY["num_frames"]
    x, t, y = make_inputs()
    assert torch.equal(run(loaded, x, t, y), run(model, x, t, y))


def test_samples_are_independent_of_batch():
    model = make_model()
    x, t, y = make_inputs()
    batched = run(model, x, t, y)
    for i in range(BATCH):
        alone = run(model, x[i : i + 1], t[i : i + 1], y[i : i + 1])
        torch.testing.assert_close(alone, batched[i : i + 1], atol=1e-5, rtol=0)


def test_output_depends_on_class_and_timestep():
    model = make_model()
    x, t, y = make_inputs()
    base = run(model, x, t, y)
    other_class = (y + 1) % TINY["num_embeds_ada_norm"]
    other_time = (t + 250) % 1000
    class_diff = (run(model, x, t, other_class) - base).abs().flatten(1).amax(dim=1)  # (N,)
    time_diff = (run(model, x, other_time, y) - base).abs().flatten(1).amax(dim=1)  # (N,)
    assert (class_diff > 1e-3).all()
    assert (time_diff > 1e-3).all()


def test_temporal_mixing_first_frame_reaches_last():
    model = make_model()
    x, t, y = make_inputs()
    x2 = x.clone()
    x2[:, :, 0] += torch.randn_like(x2[:, :, 0])
    out, out2 = run(model, x, t, y), run(model, x2, t, y)
    last = TINY["num_frames"] - 1
    assert (out2[:, :, last] - out[:, :, last]).abs().amax() > 1e-3


def test_frames_do_not_interact_when_temporal_blocks_are_identity():
    # Control for the test above: with the temporal blocks' adaLN-Zero gates zeroed they are the identity.
    model = make_model()
    with torch.no_grad():
        for block in model.temporal_transformer_blocks:
            block.norm1.linear.weight.zero_()
            block.norm1.linear.bias.zero_()
    x, t, y = make_inputs()
    x2 = x.clone()
    x2[:, :, 0] += 1.0
    last = TINY["num_frames"] - 1
    torch.testing.assert_close(run(model, x2, t, y)[:, :, last], run(model, x, t, y)[:, :, last])


def test_null_class_is_accepted():
    model = make_model()
    null_id = model.config.num_embeds_ada_norm
    x, t, _ = make_inputs()
    y_null = torch.full((BATCH,), null_id, dtype=torch.long)
    out = run(model, x, t, y_null)
    assert out.shape == x.shape and torch.isfinite(out).all()
    with pytest.raises(IndexError):
        run(model, x, t, torch.full((BATCH,), null_id + 1, dtype=torch.long))


def test_default_config_has_null_class_row():
    model = SpaceTimeDiTModel(num_layers=1)
    table = model.transformer_blocks[0].norm1.emb.class_embedder.embedding_table
    assert table.num_embeddings == model.config.num_embeds_ada_norm + 1 == 1001
    assert model.out_channels == model.config.in_channels


def test_no_label_dropout_inside_the_model_even_in_training_mode():
    """Training code drops whole samples' labels; the blocks never drop a label on their own."""
    model = make_model().train()
    x, t, y = make_inputs(batch=16)
    with torch.no_grad():
        out = model(x, t, y).sample
    model.eval()
    assert torch.allclose(out, run(model, x, t, y), atol=1e-5)
