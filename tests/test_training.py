"""The training code runs end to end at toy size and writes directories the service loads."""

from pathlib import Path

import torch
from diffusers import DiTPipeline

from models.loading import load_model
from models.training import shapes
from models.training.train import Recipe, save_pipeline, train_image_dit, train_vae, train_video_dit

TINY = Recipe(steps=3, batch_size=4, learning_rate=1e-3, warmup_steps=1)


def test_a_few_steps_of_each_recipe_save_loadable_pipelines(tmp_path: Path) -> None:
    vae, vae_stats = train_vae(TINY)
    assert vae_stats["steps"] == 3 and vae.config.scaling_factor > 0
    image_dit, image_stats = train_image_dit(vae, TINY, hidden_heads=1, num_layers=1)
    video_dit, _ = train_video_dit(
        vae, Recipe(steps=1, batch_size=2, learning_rate=1e-3, warmup_steps=1), 1, 1
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
