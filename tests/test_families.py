"""Every DiT family through the one batched sampler equals its own diffusers pipeline.

Tiny random-weight checkpoints of each family are built from config and saved in the hub layout
(tests/tiny_models.py, tests/tiny_text_models.py), loaded through the registry, and sampled by our code;
the reference is the family's diffusers pipeline called once per request with the same seed. Batching
four different requests (prompts, negative prompts, seeds, guidance scales) changes none of them.
"""

from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from diffusers import DiTPipeline, PixArtAlphaPipeline, PixArtSigmaPipeline, WanPipeline

from models.loading import LoadedModel, ModelLoadError, RowCondition, load_model
from worker.sampling import StepCallback, generate

CPU = torch.device("cpu")
MAX_PIXEL_DIFF = 2  # out of 255, fp32 on the CPU
STEPS = 6
VIDEO_FRAMES = 5  # 1 + 4: two latent frames through Wan's causal 3D VAE
# (condition, seed, guidance): different prompts, a repeated prompt, negative prompts, no-CFG rows.
TEXT_REQUESTS = [
    (RowCondition(prompt="A red fox under the sky"), 11, 4.5),
    (RowCondition(prompt="a blue car in the city at night", negative_prompt="blurry"), 12, 7.0),
    (RowCondition(prompt="A red fox under the sky"), 13, 1.0),
    (RowCondition(prompt="a small bird", negative_prompt="ugly drawing"), 14, 2.0),
]
CLASS_REQUESTS = [
    (RowCondition(class_label=3), 11, 4.0),
    (RowCondition(class_label=17), 12, 7.0),
    (RowCondition(class_label=3), 13, 1.0),
    (RowCondition(class_label=9), 14, 2.0),
]
FAMILIES = {
    # model_dirs key: (pipeline class, requests)
    "img": (DiTPipeline, CLASS_REQUESTS),
    "pixart-alpha": (PixArtAlphaPipeline, TEXT_REQUESTS),
    "pixart-sigma": (PixArtSigmaPipeline, TEXT_REQUESTS),
    "wan": (WanPipeline, TEXT_REQUESTS),
}


def _pipeline_output(pipe: Any, condition: RowCondition, seed: int, guidance: float) -> np.ndarray:
    """One request through the family's own pipeline, as 8-bit pixels (numpy_to_pil's rounding)."""
    common = {
        "guidance_scale": guidance,
        "num_inference_steps": STEPS,
        "generator": torch.Generator().manual_seed(seed),
        "output_type": "np",
    }
    if isinstance(pipe, DiTPipeline):
        out = pipe(class_labels=[condition.class_label], **common).images
    elif isinstance(pipe, WanPipeline):
        out = pipe(
            condition.prompt,
            negative_prompt=condition.negative_prompt,
            height=32,
            width=32,
            num_frames=VIDEO_FRAMES,
            **common,
        ).frames
    else:
        out = pipe(
            condition.prompt,
            negative_prompt=condition.negative_prompt,
            height=32,
            width=32,
            use_resolution_binning=False,
            clean_caption=False,
            **common,
        ).images
    return (np.asarray(out[0]) * 255).round().astype(int)


def _ours(
    model: LoadedModel, requests: list[tuple[RowCondition, int, float]], on_step: StepCallback | None = None
) -> np.ndarray:
    """The service's sampler on these requests as one batch; rows dropped by on_step are left out."""
    frames = VIDEO_FRAMES if model.kind == "video" else 1
    pixels, rows = generate(
        model,
        [condition for condition, _, _ in requests],
        [seed for _, seed, _ in requests],
        [guidance for _, _, guidance in requests],
        STEPS,
        32,
        32,
        frames,
        on_step=on_step,
    )
    if on_step is None:
        assert rows.tolist() == list(range(len(requests)))
    return pixels.numpy().astype(int)


@pytest.fixture(scope="module", params=list(FAMILIES))
def family(request: pytest.FixtureRequest, model_dirs: dict[str, Path]) -> tuple[LoadedModel, Any, list]:
    key = request.param
    pipeline_class, requests = FAMILIES[key]
    pipe = pipeline_class.from_pretrained(model_dirs[key])
    pipe.set_progress_bar_config(disable=True)
    return load_model(key, model_dirs[key], CPU), pipe, requests


def test_solo_request_equals_the_pipeline(family: tuple[LoadedModel, Any, list]) -> None:
    model, pipe, requests = family
    condition, seed, guidance = requests[1]
    expected = _pipeline_output(pipe, condition, seed, guidance)
    ours = _ours(model, [requests[1]])[0]
    assert ours.shape == expected.shape
    assert np.abs(ours - expected).max() <= MAX_PIXEL_DIFF, f"{model.family}: solo output differs"
    assert expected.std() > 1  # not two blank pictures


@pytest.mark.slow
def test_a_batch_of_four_requests_equals_four_pipeline_calls(family: tuple[LoadedModel, Any, list]) -> None:
    model, pipe, requests = family
    batched = _ours(model, requests)
    for k, (condition, seed, guidance) in enumerate(requests):
        expected = _pipeline_output(pipe, condition, seed, guidance)
        diff = np.abs(batched[k] - expected).max()
        assert diff <= MAX_PIXEL_DIFF, f"{model.family}: row {k} is {diff}/255 off the pipeline in a batch"
    # The requests really differ: prompt (or label), seed and guidance each change the picture.
    assert np.abs(batched[0] - batched[1]).max() > 10 and np.abs(batched[0] - batched[2]).max() > 10


@pytest.mark.parametrize("key", ["pixart-alpha", "wan"])
def test_each_distinct_text_is_encoded_once_per_batch(key: str, model_dirs: dict[str, Path]) -> None:
    model = load_model(key, model_dirs[key], CPU)
    calls: list[int] = []
    model.text_encoder.register_forward_hook(lambda _module, args, _out: calls.append(args[0].shape[0]))
    model.conditions([condition for condition, _, _ in TEXT_REQUESTS])
    # 3 distinct prompts + 3 distinct negative prompts ("", "blurry", "ugly drawing"), in one call
    assert calls == [6]


def test_negative_prompt_changes_a_text_model_output(model_dirs: dict[str, Path]) -> None:
    model = load_model("pixart", model_dirs["pixart-sigma"], CPU)
    rows = [RowCondition(prompt="a dog"), RowCondition(prompt="a dog", negative_prompt="a cat")]
    pixels, _ = generate(model, rows, [5, 5], [4.5, 4.5], STEPS, 32, 32)
    assert (pixels[0].int() - pixels[1].int()).abs().max() > 5


def test_text_models_describe_their_limits(model_dirs: dict[str, Path]) -> None:
    pixart = load_model("p", model_dirs["pixart-alpha"], CPU)
    wan = load_model("w", model_dirs["wan"], CPU)
    assert (pixart.family, pixart.kind, pixart.conditioning, pixart.spec().sizes) == (
        "pixart",
        "image",
        "text",
        ["32x32"],
    )
    assert pixart.spec().defaults.model_dump() == {
        "num_inference_steps": 20,
        "guidance_scale": 4.5,
        "num_frames": None,
    }
    spec = wan.spec()
    assert (spec.family, spec.kind, spec.sizes[0], spec.size_multiple, spec.frames_multiple) == (
        "wan",
        "video",
        "832x480",
        16,
        4,
    )
    assert (spec.defaults.num_inference_steps, spec.defaults.guidance_scale, spec.max_frames) == (50, 5.0, 81)
    assert wan.latent_shape(832, 480, 81) == (16, 21, 60, 104)


def test_wan_2_2_checkpoints_are_refused_by_name(model_dirs: dict[str, Path], tmp_path: Path) -> None:
    import json
    import shutil

    copy = shutil.copytree(model_dirs["wan"], tmp_path / "wan22")
    index = json.loads((copy / "model_index.json").read_text())
    index |= {"transformer_2": ["diffusers", "WanTransformer3DModel"], "boundary_ratio": 0.875}
    (copy / "model_index.json").write_text(json.dumps(index))
    with pytest.raises(ModelLoadError, match=r"model 'w22'.*Wan 2\.2.*serve Wan 2\.1"):
        load_model("w22", copy, CPU)


def test_an_unknown_pipeline_is_refused_with_the_supported_list(
    model_dirs: dict[str, Path], tmp_path: Path
) -> None:
    import json
    import shutil

    copy = shutil.copytree(model_dirs["img"], tmp_path / "sd")
    index = json.loads((copy / "model_index.json").read_text()) | {"_class_name": "StableDiffusionPipeline"}
    (copy / "model_index.json").write_text(json.dumps(index))
    with pytest.raises(
        ModelLoadError, match=r"StableDiffusionPipeline is not a supported DiT family.*WanPipeline"
    ):
        load_model("sd", copy, CPU)


def test_dit_xl_2_layout_with_the_legacy_transformer_class_loads_as_dit(
    model_dirs: dict[str, Path], tmp_path: Path
) -> None:
    """facebook/DiT-XL-2-256 names its transformer Transformer2DModel, in model_index and config."""
    import json
    import shutil

    copy = shutil.copytree(model_dirs["img"], tmp_path / "dit-xl-layout")
    for file, key in (
        (copy / "model_index.json", "transformer"),
        (copy / "transformer" / "config.json", None),
    ):
        data = json.loads(file.read_text())
        if key:
            data[key] = ["diffusers", "Transformer2DModel"]
        else:
            data["_class_name"] = "Transformer2DModel"
        file.write_text(json.dumps(data))
    legacy, original = load_model("xl", copy, CPU), load_model("img", model_dirs["img"], CPU)
    assert (legacy.family, legacy.kind, type(legacy.transformer).__name__) == (
        "dit",
        "image",
        "DiTTransformer2DModel",
    )
    assert np.array_equal(_ours(legacy, CLASS_REQUESTS[:1]), _ours(original, CLASS_REQUESTS[:1]))


@pytest.mark.parametrize("key", ["pixart-sigma", "wan"])
def test_a_row_leaving_mid_loop_leaves_the_others_unchanged(key: str, model_dirs: dict[str, Path]) -> None:
    """Cancel at a step boundary drops the row from the conditions and the multistep solver's history."""
    model = load_model(key, model_dirs[key], CPU)
    requests = TEXT_REQUESTS[:3]
    full = _ours(model, requests)

    def drop_row_1_after_step_3(done: int, total: int, rows: torch.Tensor) -> torch.Tensor | None:
        return (rows != 1) if done == 3 else None

    kept = _ours(model, requests, on_step=drop_row_1_after_step_3)
    assert kept.shape[0] == 2
    assert np.abs(kept - full[[0, 2]]).max() <= MAX_PIXEL_DIFF
