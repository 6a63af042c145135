"""The generated training data and the analytic judge that scores the bundled models."""

import numpy as np

from evaluation.judge import frechet_distance, judge_direction, judge_image, judge_video, pooled_features
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


def test_judge_reads_generated_images() -> None:
    images, labels = shapes.image_batch(np.random.default_rng(1), 500)
    names = shapes.image_labels()
    verdicts = [judge_image(image).label for image in images]
    accuracy = np.mean([verdict == names[label] for verdict, label in zip(verdicts, labels, strict=True)])
    assert accuracy >= 0.99
    assert judge_image(np.full((32, 32, 3), shapes.BACKGROUND, np.uint8)).label == "none none"


def test_videos_move_steadily_and_the_judge_sees_where() -> None:
    videos, labels = shapes.video_batch(np.random.default_rng(2), 80)
    names = shapes.video_labels()
    for frames, label in zip(videos, labels, strict=True):
        verdict, direction, consistency = judge_video(frames)
        assert direction == names[label].split()[-1]
        assert verdict.label == " ".join(names[label].split()[:2])
        assert consistency >= 0.8
    assert judge_direction(np.repeat(videos[:1, :1], 16, axis=1)[0]) == "none"  # a still clip does not move


def test_frechet_distance_separates_distributions() -> None:
    real_a = pooled_features(shapes.image_batch(np.random.default_rng(3), 400)[0])
    real_b = pooled_features(shapes.image_batch(np.random.default_rng(4), 400)[0])
    noise = np.random.default_rng(5).integers(0, 256, (400, 32, 32, 3), dtype=np.uint8)
    same, different = frechet_distance(real_a, real_b), frechet_distance(real_a, pooled_features(noise))
    assert 0 <= same < different / 10
