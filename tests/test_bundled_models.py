"""The shipped models load (the image one through diffusers too) and their labels are recognisable."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import DiTPipeline

from evaluation.classifier import ShapeClassifier, classify, load_classifier
from evaluation.judge import judge_clips
from evaluation.run import generate
from models.bundled import BUNDLED_DIR, IMAGE_MODEL_DIR, VIDEO_MODEL_DIR
from models.loading import LoadedModel, load_model
from models.training.shapes import image_labels

MAX_BUNDLE_BYTES = 30 * 1000 * 1000
CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def image_model() -> LoadedModel:
    return load_model("dit-shapes-image", IMAGE_MODEL_DIR, CPU)


@pytest.fixture(scope="module")
def judge() -> ShapeClassifier:
    return load_classifier()


def test_bundle_is_small_and_in_safetensors() -> None:
    files = [path for path in BUNDLED_DIR.rglob("*") if path.is_file() and path.suffix != ".py"]
    assert sum(path.stat().st_size for path in files) <= MAX_BUNDLE_BYTES
    weight_suffixes = (".bin", ".pt", ".pth", ".ckpt", ".safetensors")
    weights = [path for path in files if path.suffix in weight_suffixes]
    assert weights and all(path.suffix == ".safetensors" for path in weights)


def test_image_model_loads_in_diffusers_own_pipeline(image_model: LoadedModel) -> None:
    pipe = DiTPipeline.from_pretrained(IMAGE_MODEL_DIR)
    assert pipe.get_label_ids(["red circle"]) == [image_model.labels.index("red circle")]
    assert image_model.null_class_id == 1000 and image_model.kind == "image"


@pytest.mark.slow
def test_red_circle_is_a_red_circle(image_model: LoadedModel, judge: ShapeClassifier) -> None:
    label = image_model.labels.index("red circle")
    images = generate(image_model, [label] * 4, [0, 1, 2, 3], 4.0, 25, "ddim")
    verdicts = [image_model.labels[c] for c in classify(images, judge)]
    assert verdicts.count("red circle") >= 3, verdicts


@pytest.mark.slow
def test_cfg_helps(image_model: LoadedModel, judge: ShapeClassifier) -> None:
    labels = [
        image_model.labels.index(name) for name in ("yellow square", "blue diamond", "cyan triangle")
    ] * 4
    seeds = list(range(len(labels)))
    guided = (classify(generate(image_model, labels, seeds, 4.0, 25, "ddim"), judge) == labels).mean()
    unguided = (classify(generate(image_model, labels, seeds, 1.0, 25, "ddim"), judge) == labels).mean()
    assert guided >= 0.75 and guided > unguided


@pytest.mark.slow
def test_ten_multistep_steps_keep_the_label(image_model: LoadedModel, judge: ShapeClassifier) -> None:
    """The v-prediction image DiT holds up under 10 DPM-Solver++ steps (the eps one fell to 72%)."""
    assert image_model.scheduler.config.prediction_type == "v_prediction"
    names = ("green diamond", "red circle", "blue triangle", "cyan square")
    labels = [image_model.labels.index(name) for name in names] * 3
    images = generate(image_model, labels, list(range(len(labels))), 4.0, 10, "dpm-solver++")
    assert (classify(images, judge) == labels).mean() >= 0.75


def test_labels_change_the_picture(image_model: LoadedModel) -> None:
    ids = [image_model.labels.index(name) for name in ("yellow square", "cyan diamond")]
    a, b = generate(image_model, ids, [5, 5], 4.0, 10, "ddim")
    assert np.abs(a.astype(int) - b.astype(int)).mean() > 5


@pytest.mark.parametrize("model_dir", [IMAGE_MODEL_DIR, VIDEO_MODEL_DIR], ids=["image", "video"])
def test_training_record_is_shipped(model_dir: Path) -> None:
    record = json.loads((model_dir / "training.json").read_text())
    assert record["transformer"]["steps"] > 0 and record["total_minutes"] < 60


@pytest.fixture(scope="module")
def video_model() -> LoadedModel:
    return load_model("dit-shapes-video", VIDEO_MODEL_DIR, CPU)


def test_video_model_is_stored_in_fp16_and_served_in_fp32(video_model: LoadedModel) -> None:
    assert (video_model.kind, video_model.max_frames, len(video_model.labels)) == ("video", 16, 96)
    assert all(param.dtype == torch.float32 for param in video_model.transformer.parameters())


@pytest.mark.slow
def test_videos_show_the_prompted_shape_moving_the_prompted_way(
    video_model: LoadedModel, judge: ShapeClassifier
) -> None:
    names = ["magenta triangle moving left", "cyan square moving up"]
    clips = generate(video_model, [video_model.labels.index(name) for name in names], [0, 1], 4.0, 25, "ddim")
    verdicts = [
        (image_labels()[still], direction, consistency)
        for still, direction, consistency in judge_clips(clips, judge)
    ]
    assert [(still, direction) for still, direction, _ in verdicts] == [
        ("magenta triangle", "left"),
        ("cyan square", "up"),
    ], verdicts
    assert all(consistency >= 0.75 for _, _, consistency in verdicts), verdicts
