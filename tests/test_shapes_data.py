"""The generated training data and the judge (shipped classifier + centroid tracks) that scores the models."""

import numpy as np
import torch

from evaluation.classifier import augment, classify, embed, load_classifier, to_input
from evaluation.judge import frechet_distance, judge_clips, judge_direction
from models.training import shapes


def test_labels_read_like_prompts() -> None:
    labels = shapes.image_labels()
    assert len(labels) == 24 and labels[0] == "red circle" and "blue triangle" in labels
    assert len(shapes.video_labels()) == 96 and "green square moving up" in shapes.video_labels()


def test_data_is_reproducible_from_a_seed() -> None:
    a, la = shapes.image_batch(np.random.default_rng(7), 8)
    b, lb = shapes.image_batch(np.random.default_rng(7), 8)
    c, _ = shapes.image_batch(np.random.default_rng(8), 8)
    assert np.array_equal(a, b) and np.array_equal(la, lb) and not np.array_equal(a, c)
    assert a.shape == (8, 32, 32, 3) and a.dtype == np.uint8


def test_classifier_reads_clean_and_degraded_renders() -> None:
    classifier = load_classifier()
    images, labels = shapes.image_batch(np.random.default_rng(1), 500)
    assert (classify(images, classifier) == labels).mean() >= 0.99
    degraded = augment(to_input(images), torch.Generator().manual_seed(0))  # blur, noise, colour shift
    with torch.no_grad():
        predictions = classifier(degraded).argmax(1).numpy()
    assert (predictions == labels).mean() >= 0.95


def test_videos_move_steadily_and_the_judge_sees_where() -> None:
    videos, labels = shapes.video_batch(np.random.default_rng(2), 40)
    names = shapes.video_labels()
    for (still, direction, consistency), label in zip(
        judge_clips(videos, load_classifier()), labels, strict=True
    ):
        assert shapes.image_labels()[still] + " moving " + direction == names[label]
        assert consistency >= 0.8
    assert judge_direction(np.repeat(videos[:1, :1], 16, axis=1)[0]) == "none"  # a still clip does not move


def test_frechet_distance_separates_distributions() -> None:
    classifier = load_classifier()
    real_a = embed(shapes.image_batch(np.random.default_rng(3), 300)[0], classifier)
    real_b = embed(shapes.image_batch(np.random.default_rng(4), 300)[0], classifier)
    noise = np.random.default_rng(5).integers(0, 256, (300, 32, 32, 3), dtype=np.uint8)
    same, different = frechet_distance(real_a, real_b), frechet_distance(real_a, embed(noise, classifier))
    assert 0 <= same < different / 10
