"""The sampler against diffusers' own DiTPipeline, and per-row independence of batched CFG."""

from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import DiTPipeline, DPMSolverMultistepScheduler

from models.loading import LoadedModel, RowCondition, load_model
from worker.sampling import cfg_denoise, generate, initial_noise

CPU = torch.device("cpu")
MAX_PIXEL_DIFF = 1  # out of 255


@pytest.fixture(scope="module")
def image_model(model_dirs: dict[str, Path]) -> LoadedModel:
    return load_model("img", model_dirs["img"], CPU)


@pytest.fixture(scope="module")
def video_model(model_dirs: dict[str, Path]) -> LoadedModel:
    return load_model("vid", model_dirs["vid"], CPU)


def _generate(model, seeds, labels, scales, steps=8, scheduler=None, on_step=None, frames=1):  # type: ignore[no-untyped-def]
    size = model.native_size
    conditions = [RowCondition(class_label=label) for label in labels]
    pixels, rows = generate(
        model, conditions, seeds, scales, steps, size, size, frames, scheduler=scheduler, on_step=on_step
    )
    return pixels.numpy().astype(int), rows


@pytest.mark.parametrize("guidance", [1.0, 4.0])
@pytest.mark.slow
def test_solo_output_equals_ditpipeline(
    image_model: LoadedModel, model_dirs: dict[str, Path], guidance: float
) -> None:
    pipe = DiTPipeline.from_pretrained(model_dirs["img"])
    pipe.set_progress_bar_config(disable=True)
    expected = pipe(
        class_labels=[5],
        guidance_scale=guidance,
        num_inference_steps=8,
        generator=torch.Generator().manual_seed(99),
        output_type="np",
    ).images
    expected = (expected * 255).round().astype(int)  # as DiTPipeline's numpy_to_pil does
    ours, _ = _generate(image_model, [99], [5], [guidance])
    assert np.abs(ours - expected).max() <= MAX_PIXEL_DIFF
    assert expected.std() > 1  # the comparison is not between two blank images


@pytest.mark.slow
def test_batched_rows_equal_solo_rows(image_model: LoadedModel) -> None:
    seeds, labels, scales = [11, 12, 13, 14], [0, 7, 7, 23], [4.0, 1.0, 7.5, 0.0]
    batched, _ = _generate(image_model, seeds, labels, scales)
    for k in range(len(seeds)):
        solo, _ = _generate(image_model, [seeds[k]], [labels[k]], [scales[k]])
        assert np.abs(batched[k] - solo[0]).max() <= MAX_PIXEL_DIFF, f"row {k} changed by batching"


def test_guidance_and_label_change_the_output(image_model: LoadedModel) -> None:
    base, _ = _generate(image_model, [5, 5, 5], [1, 1, 2], [4.0, 1.0, 4.0])
    assert np.abs(base[0] - base[1]).max() > 10  # CFG on vs off
    assert np.abs(base[0] - base[2]).max() > 10  # another class


def test_cfg_denoise_applies_each_rows_scale_to_its_own_rows() -> None:
    def predict(x: torch.Tensor, t: torch.Tensor, cond: dict[str, torch.Tensor]) -> torch.Tensor:
        # cond rows predict y, the null class (1000) predicts 0: eps = s * y for guided rows
        y = cond["class_labels"]
        return (y.float() * (y != 1000)).view(-1, 1, 1, 1).expand(-1, 4, 2, 2)  # (B, C, 2, 2)

    x = torch.zeros(3, 4, 2, 2)
    labels = torch.tensor([1, 2, 3])
    eps = cfg_denoise(
        predict,
        x,
        torch.zeros(3),
        {"class_labels": labels},
        {"class_labels": torch.full_like(labels, 1000)},
        torch.tensor([2.0, 1.0, 5.0]),
    )
    assert eps.shape == (3, 4, 2, 2)
    assert eps[:, 0, 0, 0].tolist() == [2.0, 2.0, 15.0]  # s*y guided; row 2 (s=1) is its cond output


def test_dropping_rows_mid_loop_leaves_the_others_unchanged(image_model: LoadedModel) -> None:
    """Cancel at a step boundary with a multistep solver whose history must be filtered too."""

    def scheduler() -> DPMSolverMultistepScheduler:
        return DPMSolverMultistepScheduler.from_config(image_model.scheduler.config)

    seeds, labels, scales = [1, 2, 3], [3, 4, 5], [4.0, 4.0, 2.0]
    full, _ = _generate(image_model, seeds, labels, scales, scheduler=scheduler())

    def cancel_row_1_at_step_3(done: int, total: int, rows: torch.Tensor) -> torch.Tensor | None:
        return (rows != 1) if done == 3 else None

    partial, rows = _generate(
        image_model, seeds, labels, scales, scheduler=scheduler(), on_step=cancel_row_1_at_step_3
    )
    assert rows.tolist() == [0, 2]
    assert np.abs(partial - full[[0, 2]]).max() <= MAX_PIXEL_DIFF


def test_video_rows_are_independent_and_shaped(video_model: LoadedModel) -> None:
    batched, _ = _generate(video_model, [1, 2], [0, 50], [4.0, 3.0], steps=4, frames=6)
    solo, _ = _generate(video_model, [2], [50], [3.0], steps=4, frames=6)
    assert batched.shape == (2, 6, 32, 32, 3)
    assert np.abs(batched[1] - solo[0]).max() <= MAX_PIXEL_DIFF


def test_noise_depends_only_on_the_seed() -> None:
    generators = [torch.Generator().manual_seed(seed) for seed in (3, 4)]
    pair = initial_noise(generators, (4, 2, 2), CPU)
    alone = initial_noise([torch.Generator().manual_seed(4)], (4, 2, 2), CPU)
    assert torch.equal(pair[1], alone[0]) and not torch.equal(pair[0], pair[1])
