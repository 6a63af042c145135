"""Step caching decided per row: equal to diffusers' FirstBlockCache where that decides alike, and a
row's output independent of its batch, for every family, in static and continuous batches."""

from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import DiTPipeline
from diffusers.hooks import FirstBlockCacheConfig, apply_first_block_cache
from diffusers.hooks.hooks import CacheContext, _set_cache_context
from pydantic import ValidationError
from redis import Redis

from dit_serve.caching import CachePolicy, CachePolicyName, parse_policy, resolve
from dit_serve.contract import JobKind
from models.bundled import IMAGE_MODEL_DIR
from models.loading import LoadedModel, RowCondition, load_model
from tests.worker_harness import InProcessWorker, job_request
from worker.continuous import RunningBatch
from worker.sampling import generate
from worker.step_cache import RowCaches

CPU = torch.device("cpu")
MAX_PIXEL_DIFF = 1  # out of 255: batching's own tolerance (tests/test_batching.py)
STEPS = 16
FIRST_BLOCK = CachePolicy(policy=CachePolicyName.FIRST_BLOCK)
INTERVAL = CachePolicy(policy=CachePolicyName.INTERVAL, interval=3, warmup=0.25)
# diffusers' FirstBlockCache has no warm-up, no limit on skips in a row, and reuses the last residual
LIKE_DIFFUSERS = CachePolicy(
    policy=CachePolicyName.FIRST_BLOCK, threshold=0.1, max_skip=10, warmup=0, order=0
)


@pytest.fixture(scope="module")
def bundled_image() -> LoadedModel:
    return load_model("dit-shapes-image", IMAGE_MODEL_DIR, CPU)


def _sample(
    model: LoadedModel,
    labels: list[int],
    seeds: list[int],
    policies: list[CachePolicy | None],
    steps: int,
    frames: int = 1,
    prompts: bool = False,
) -> tuple[np.ndarray, RowCaches]:
    caches = RowCaches.of(policies)
    conditions = [
        RowCondition(prompt=f"shape {label}") if prompts else RowCondition(class_label=label)
        for label in labels
    ]
    pixels, _ = generate(model, conditions, seeds, [4.0] * len(labels), steps, 32, 32, frames, caches=caches)
    return pixels.numpy().astype(int), caches


@pytest.mark.slow  # two pipeline runs beside ours
def test_first_block_rows_equal_diffusers_first_block_cache_on_each_image_alone(
    bundled_image: LoadedModel,
) -> None:
    """A DiTPipeline call of one image runs its conditional and unconditional rows as one batch, which
    diffusers' hook decides for together: what our rule decides per output row, beside other rows."""
    labels, seeds = [0, 1, 4], [10, 11, 12]
    ours, caches = _sample(bundled_image, labels, seeds, [LIKE_DIFFUSERS, None, LIKE_DIFFUSERS], STEPS)
    assert caches.rows[0].skipped > 0 and caches.rows[2].skipped > 0
    pipe = DiTPipeline.from_pretrained(IMAGE_MODEL_DIR)
    pipe.set_progress_bar_config(disable=True)
    apply_first_block_cache(pipe.transformer, FirstBlockCacheConfig(threshold=0.1))
    for row in (0, 2):
        # DiT is no CacheMixin, so the pipeline's transformer gets its cache context set directly.
        _set_cache_context(pipe.transformer, CacheContext(f"image-{row}"))
        image = pipe(
            class_labels=[labels[row]],
            num_inference_steps=STEPS,
            guidance_scale=4.0,
            generator=torch.Generator().manual_seed(seeds[row]),
            output_type="np",
        ).images[0]
        _set_cache_context(pipe.transformer, None)
        expected = (image * 255).round().astype(int)
        assert np.abs(ours[row] - expected).max() <= MAX_PIXEL_DIFF, f"row {row}"
    uncached, _ = _sample(bundled_image, labels[1:2], seeds[1:2], [None], STEPS)
    assert np.abs(ours[1] - uncached[0]).max() <= MAX_PIXEL_DIFF  # the uncached row beside them


def test_rows_with_different_policies_equal_their_solo_runs(bundled_image: LoadedModel) -> None:
    policies = [None, FIRST_BLOCK, INTERVAL, CachePolicy(policy=CachePolicyName.FIRST_BLOCK, threshold=0.3)]
    labels, seeds = [0, 2, 3, 5], [1, 2, 3, 4]
    batch, caches = _sample(bundled_image, labels, seeds, policies, STEPS)
    for row, policy in enumerate(policies):
        solo, solo_caches = _sample(
            bundled_image, labels[row : row + 1], seeds[row : row + 1], [policy], STEPS
        )
        assert np.abs(batch[row] - solo[0]).max() <= MAX_PIXEL_DIFF, f"row {row} ({policy})"
        if policy is not None:
            assert caches.rows[row].skipped == solo_caches.rows[0].skipped > 0
    # the schedule's count: 4 warm-up steps, then every 3rd of the other 12 runs
    assert caches.rows[2].skipped == 8
    uncached, _ = _sample(bundled_image, labels, seeds, [None] * 4, STEPS)
    assert all(np.abs(batch[row] - uncached[row]).max() > MAX_PIXEL_DIFF for row in (1, 2, 3))


@torch.inference_mode()
def test_a_cached_row_joining_a_continuous_batch_equals_its_solo_run(bundled_image: LoadedModel) -> None:
    steps = 12
    batch = RunningBatch(bundled_image, steps, 32, 32)
    first = batch.add([RowCondition(class_label=1)], [7], [4.0], [INTERVAL])
    for _ in range(4):
        batch.step()
    joined = batch.add(
        [RowCondition(class_label=3), RowCondition(class_label=0)], [8, 9], [4.0, 4.0], [FIRST_BLOCK, None]
    )
    latents = {}
    while len(batch):
        batch.step()
        done = batch.finished()
        if done:
            latents.update(zip(done, batch.pop(done), strict=True))
    pixels = bundled_image.decode(torch.stack([latents[row] for row in first + joined])).numpy().astype(int)
    for index, (label, seed, policy) in enumerate([(1, 7, INTERVAL), (3, 8, FIRST_BLOCK), (0, 9, None)]):
        solo, _ = _sample(bundled_image, [label], [seed], [policy], steps)
        assert np.abs(pixels[index] - solo[0]).max() <= MAX_PIXEL_DIFF, f"row {index} ({policy})"
    assert not batch.caches.rows  # rows that left took their cache state with them


@torch.inference_mode()
def test_a_cached_row_joining_a_multistep_continuous_batch_equals_its_solo_run(
    model_dirs: dict[str, Path],
) -> None:
    """PixArt's DPM-Solver++ keeps each row's history; caching changes only the rows' predictions."""
    model = load_model("pixart-alpha", model_dirs["pixart-alpha"], CPU)
    steps = 8
    batch = RunningBatch(model, steps, 32, 32)
    first = batch.add([RowCondition(prompt="shape 0")], [5], [4.0], [INTERVAL])
    for _ in range(3):
        batch.step()
    joined = batch.add([RowCondition(prompt="shape 1")], [6], [4.0], [None])
    latents = {}
    while len(batch):
        batch.step()
        if done := batch.finished():
            latents.update(zip(done, batch.pop(done), strict=True))
    pixels = model.decode(torch.stack([latents[row] for row in first + joined])).numpy().astype(int)
    for index, (label, seed, policy) in enumerate([(0, 5, INTERVAL), (1, 6, None)]):
        solo, caches = _sample(model, [label], [seed], [policy], steps, prompts=True)
        assert np.abs(pixels[index] - solo[0]).max() <= MAX_PIXEL_DIFF, f"row {index} ({policy})"
        if policy is not None:
            assert caches.rows[0].skipped > 0


@pytest.mark.slow  # builds and loads a text encoder per text family
@pytest.mark.parametrize(("key", "frames"), [("vid", 5), ("pixart-alpha", 1), ("wan", 5)])
def test_every_family_caches_rows_independently_of_their_batch(
    key: str, frames: int, model_dirs: dict[str, Path]
) -> None:
    """Video DiTs see a forward row as many block rows (one per frame); text models slice their
    encoder states and masks by row too."""
    model = load_model(key, model_dirs[key], CPU)
    text = model.conditioning == "text"
    policies = [INTERVAL, None, CachePolicy(policy=CachePolicyName.FIRST_BLOCK, threshold=1.0, warmup=0.25)]
    batch, caches = _sample(model, [0, 1, 2], [5, 6, 7], policies, 8, frames, prompts=text)
    assert caches.rows[0].skipped > 0 and caches.rows[2].skipped > 0
    for row, policy in enumerate(policies):
        solo, _ = _sample(model, [row], [5 + row], [policy], 8, frames, prompts=text)
        assert np.abs(batch[row] - solo[0]).max() <= MAX_PIXEL_DIFF, f"{key} row {row}"
    uncached, _ = _sample(model, [0], [5], [None], 8, frames, prompts=text)
    assert np.abs(batch[0] - uncached[0]).max() > 0


def test_policies_parse_resolve_and_refuse_what_they_do_not_take() -> None:
    assert parse_policy("first_block,threshold=0.2,max_skip=3") == CachePolicy(
        policy=CachePolicyName.FIRST_BLOCK, threshold=0.2, max_skip=3
    )
    assert parse_policy("auto") == "auto" and parse_policy("none") == "none"
    assert CachePolicy(policy=CachePolicyName.INTERVAL).interval == 2  # knobs left out take defaults
    assert parse_policy("interval").label() == "interval,interval=2,order=1,warmup=0.2"
    for bad in ("first_block,interval=2", "interval,threshold=0.1", "nothing", "first_block,threshold"):
        with pytest.raises((ValidationError, ValueError)):
            parse_policy(bad)
    measured = CachePolicy(policy=CachePolicyName.INTERVAL, interval=3)
    assert resolve(None, measured, None) is None  # no request choice, no server default: no caching
    assert resolve("auto", measured, None) == measured
    assert resolve(None, measured, "auto") == measured  # the server's default for the model
    assert resolve("none", measured, "auto") is None  # the request's choice wins
    assert resolve("auto", None, None) is None  # a model with no measured policy: auto is none
    assert resolve("first_block", None, None) == CachePolicy(policy=CachePolicyName.FIRST_BLOCK)


def test_a_skipped_step_extrapolates_the_last_two_residuals_at_order_one() -> None:
    caches = RowCaches()
    key = (0, 0)
    caches.remember(key, torch.tensor([1.0, 2.0]), 2)
    assert torch.equal(caches.residual_at(key, 3, order=1), torch.tensor([1.0, 2.0]))  # one run: reuse it
    caches.remember(key, torch.tensor([2.0, 0.0]), 4)
    assert torch.equal(caches.residual_at(key, 5, order=0), torch.tensor([2.0, 0.0]))
    assert torch.equal(caches.residual_at(key, 5, order=1), torch.tensor([2.5, -1.0]))  # half a gap on
    caches.drop([0])
    assert not caches.residual and not caches.earlier and not caches.ran_at


@pytest.mark.parametrize("continuous", [False, True], ids=["static", "continuous"])
def test_a_worker_counts_its_cached_rows_steps_computed_and_skipped(
    bundled_image: LoadedModel, redis: Redis, tmp_path: Path, continuous: bool
) -> None:
    worker = InProcessWorker(redis, {bundled_image.name: bundled_image}, tmp_path, continuous)
    model = bundled_image.name
    worker.enqueue("cached", job_request(JobKind.IMAGE, STEPS, model=model, cache=INTERVAL))
    worker.enqueue("plain", job_request(JobKind.IMAGE, STEPS, model=model))
    assert worker.worker.run_once()
    assert worker.status("cached") == worker.status("plain") == "finished"
    labels = {"model": model, "kind": "image"}
    # one cached row of 16 steps: 4 warm-up steps, then every 3rd of the other 12 runs; the plain row
    # is not counted
    assert worker.sample("dit_cached_row_steps_total", outcome="skipped", **labels) == 8
    assert worker.sample("dit_cached_row_steps_total", outcome="computed", **labels) == 8
