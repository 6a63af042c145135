"""LoRA adapters (dit_serve/loras.py, worker/lora.py) on tiny random-weight models of every family.

Adapters are written to disk as PEFT's `save_pretrained` writes them (adapter_config.json and
adapter_model.safetensors, keys `base_model.model.<module>.lora_A.weight`), registered into a real local
storage, and run through the service's sampler. The reference for a row is the family's own diffusers
pipeline, called alone, on a copy of the transformer with that row's adapters merged into its weights
(W + scale * alpha/r * B A): independent of PEFT's mixed-batch path that the service runs. Rows with
different adapters, scales, several adapters, or none share one batch, static and continuous.
"""

import copy
import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from diffusers import DiTPipeline
from safetensors.torch import load_file, save_file

from dit_serve.lora_registry import store_adapter
from dit_serve.loras import AppliedLora, LoraError, check_fits, read_adapter
from dit_serve.storage import LocalStorage
from models.loading import LoadedModel, RowCondition, load_model
from tests.test_families import FAMILIES, VIDEO_FRAMES, _pipeline_output
from worker.continuous import RunningBatch
from worker.lora import BASE, AdapterBank, adaptable_layers, row_adapters
from worker.sampling import generate

CPU = torch.device("cpu")
MAX_PIXEL_DIFF = 2  # out of 255 (the bound)
STEPS = 6
RANK, ALPHA = 4, 8.0


def write_adapter(
    path: Path,
    transformer: torch.nn.Module,
    seed: int,
    modules: list[str] | None = None,
    rank: int = RANK,
    strength: float = 0.5,
) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """A PEFT adapter directory with random weights strong enough to change the picture; returns them."""
    layers = adaptable_layers(transformer)
    chosen = modules or [
        m for m in layers if m.split(".")[-1] in {"to_q", "to_k", "to_v", "proj_out"} or "ff" in m
    ]
    generator = torch.Generator().manual_seed(seed)
    weights, tensors = {}, {}
    for module in chosen:
        in_features, out_features = layers[module]
        a = torch.randn(rank, in_features, generator=generator) / in_features**0.5
        b = torch.randn(out_features, rank, generator=generator) * strength
        weights[module] = (a, b)
        tensors[f"base_model.model.{module}.lora_A.weight"] = a.contiguous()
        tensors[f"base_model.model.{module}.lora_B.weight"] = b.contiguous()
    path.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(path / "adapter_model.safetensors"))
    config = {
        "peft_type": "LORA",
        "r": rank,
        "lora_alpha": ALPHA,
        "target_modules": chosen,
        "use_dora": False,
    }
    (path / "adapter_config.json").write_text(json.dumps(config))
    return weights


def merged(transformer: torch.nn.Module, adapters: list[tuple[dict, float]]) -> torch.nn.Module:
    """A copy of the transformer with each (weights, scale) merged in."""
    copied = copy.deepcopy(transformer)
    with torch.no_grad():
        for weights, scale in adapters:
            for module, (a, b) in weights.items():
                layer = copied.get_submodule(module)
                layer.weight += scale * (ALPHA / a.shape[0]) * (b @ a)
    return copied


@pytest.fixture(scope="module")
def dit(model_dirs: dict[str, Path]) -> LoadedModel:
    return load_model("img", model_dirs["img"], CPU)


@pytest.fixture(scope="module")
def base(model_dirs: dict[str, Path]) -> torch.nn.Module:
    """A transformer of its own for the references: the banks inject LoRA layers into `dit`'s."""
    return load_model("img", model_dirs["img"], CPU).transformer


@pytest.fixture(scope="module")
def registered(dit: LoadedModel, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """Two adapters of the tiny DiT, registered into a local storage."""
    root = tmp_path_factory.mktemp("loras")
    storage = LocalStorage(root / "storage")
    found: dict[str, Any] = {"storage": storage}
    for name, seed in (("red", 1), ("blue", 2)):
        weights = write_adapter(root / name, dit.transformer, seed)
        adapter = read_adapter(root / name)
        check_fits(adapter, adaptable_layers(dit.transformer), "img")
        info = store_adapter(storage, "img", name, adapter, str(root / name))
        found[name] = (info, weights)
    return found


def _pipeline_row(
    dit: LoadedModel, transformer: torch.nn.Module, label: int, seed: int, guidance: float
) -> np.ndarray:
    pipe = DiTPipeline(transformer=transformer, vae=dit.vae, scheduler=dit.new_scheduler())
    pipe.set_progress_bar_config(disable=True)
    out = pipe(
        class_labels=[label],
        guidance_scale=guidance,
        num_inference_steps=STEPS,
        generator=torch.Generator().manual_seed(seed),
        output_type="np",
    ).images
    return (np.asarray(out[0]) * 255).round().astype(int)


def _applied(registered: dict[str, Any], *named: tuple[str, float]) -> tuple[AppliedLora, ...]:
    return tuple(AppliedLora.of(registered[name][0], scale) for name, scale in named)


# rows: (label, seed, guidance, adapters): none, one at 1, one at another scale, two at once, no CFG
ROWS = [
    (3, 11, 4.0, ()),
    (3, 12, 4.0, (("red", 1.0),)),
    (5, 13, 1.0, (("blue", 1.0),)),
    (7, 14, 3.0, (("red", 0.5),)),
    (9, 15, 4.0, (("red", 1.0), ("blue", 0.7))),
]


def _reference(dit: LoadedModel, base: torch.nn.Module, registered: dict[str, Any], row: tuple) -> np.ndarray:
    label, seed, guidance, named = row
    transformer = merged(base, [(registered[name][1], scale) for name, scale in named])
    return _pipeline_row(dit, transformer, label, seed, guidance)


def test_rows_with_different_adapters_in_one_batch_equal_the_pipeline_with_each_merged(
    dit: LoadedModel, base: torch.nn.Module, registered: dict[str, Any]
) -> None:
    bank = AdapterBank(dit.transformer, registered["storage"])
    adapters = row_adapters(bank, [_applied(registered, *named) for *_, named in ROWS])
    assert adapters is not None and adapters.names[0] == BASE and len(set(adapters.names)) == len(ROWS)
    pixels, rows = generate(
        dit,
        [RowCondition(class_label=label) for label, *_ in ROWS],
        [seed for _, seed, *_ in ROWS],
        [guidance for _, _, guidance, _ in ROWS],
        STEPS,
        32,
        32,
        adapters=adapters,
    )
    ours = pixels.numpy().astype(int)
    plain = _pipeline_row(dit, base, *ROWS[1][:3])
    for k, row in enumerate(ROWS):
        expected = _reference(dit, base, registered, row)
        diff = np.abs(ours[k] - expected).max()
        assert diff <= MAX_PIXEL_DIFF, f"row {k} ({row[3]}) is {diff}/255 off the pipeline with its adapters"
    # the adapters really change the picture, and the base row stayed the base model
    assert np.abs(ours[1] - plain).max() > 20
    # outside a mixed batch the model is its base: no adapter stays active
    alone, _ = generate(dit, [RowCondition(class_label=3)], [12], [4.0], STEPS, 32, 32)
    assert np.abs(alone.numpy().astype(int)[0] - plain).max() <= MAX_PIXEL_DIFF


def test_a_row_with_an_adapter_joining_a_continuous_batch_equals_its_solo_run(
    dit: LoadedModel, base: torch.nn.Module, registered: dict[str, Any]
) -> None:
    bank = AdapterBank(dit.transformer, registered["storage"])
    batch = RunningBatch(dit, STEPS, 32, 32, bank=bank)
    first = batch.add([RowCondition(class_label=3)], [11], [4.0], loras=[_applied(registered, ("blue", 1.0))])
    for _ in range(2):
        batch.step()
    joined = batch.add(
        [RowCondition(class_label=9)], [15], [4.0], loras=[_applied(registered, ("red", 1.0), ("blue", 0.7))]
    )
    done: dict[int, np.ndarray] = {}
    while len(batch):
        batch.step()
        finished = batch.finished()
        if finished:
            decoded = dit.decode(batch.pop(finished)).numpy().astype(int)
            done.update(zip(finished, decoded, strict=True))
    for row_id, row in ((first[0], (3, 11, 4.0, (("blue", 1.0),))), (joined[0], ROWS[4])):
        diff = np.abs(done[row_id] - _reference(dit, base, registered, row)).max()
        assert diff <= MAX_PIXEL_DIFF, f"row {row_id} is {diff}/255 off its solo run"


def test_the_bank_keeps_adapters_under_its_memory_cap_least_recently_used_first(
    dit: LoadedModel, registered: dict[str, Any]
) -> None:
    red, blue = (_applied(registered, (name, 1.0)) for name in ("red", "blue"))
    bank = AdapterBank(dit.transformer, registered["storage"])
    bank.names_for([red])
    one = sum(kept.bytes for kept in bank.kept.values())
    bank.memory_bytes = one  # room for one adapter
    (blue_name,) = bank.names_for([blue])
    assert list(bank.kept) == [blue_name]  # red, least recently used, was unloaded
    (red_name,) = bank.names_for([red])
    assert list(bank.kept) == [red_name]
    # a batch that needs both keeps both, over the cap, rather than fail
    assert len(set(bank.names_for([red, blue]))) == 2 and len(bank.kept) == 2
    assert all(name in bank.tuner.peft_config for name in bank.kept)


def test_an_adapter_of_another_model_or_a_damaged_file_is_refused(
    dit: LoadedModel, tmp_path: Path, model_dirs: dict[str, Path]
) -> None:
    other = load_model("pixart", model_dirs["pixart-alpha"], CPU)
    write_adapter(tmp_path / "pixart", other.transformer, 3)
    with pytest.raises(LoraError, match="trained for another base model"):
        check_fits(read_adapter(tmp_path / "pixart"), adaptable_layers(dit.transformer), "img")
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "adapter_model.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00not json")
    (tmp_path / "bad" / "adapter_config.json").write_text("{}")
    with pytest.raises(LoraError, match="not a safetensors file"):
        read_adapter(tmp_path / "bad")
    with pytest.raises(LoraError, match="no such adapter"):
        read_adapter(tmp_path / "missing")


def write_diffusers_adapter(path: Path, transformer: torch.nn.Module, seed: int, strength: float) -> None:
    """The same kind of adapter as a diffusers LoRA file (keys transformer.<module>.lora_A.weight, no
    alpha: diffusers then scales by 1), which the pipelines' load_lora_weights reads."""
    weights = write_adapter(path / "peft", transformer, seed, strength=strength)
    tensors = {}
    for module, (a, b) in weights.items():
        tensors[f"transformer.{module}.lora_A.weight"] = a.contiguous()
        tensors[f"transformer.{module}.lora_B.weight"] = b.contiguous()
    save_file(tensors, str(path / "pytorch_lora_weights.safetensors"))


@pytest.mark.slow  # loads each text family's pipeline twice
@pytest.mark.parametrize("key", ["pixart-alpha", "wan"])
def test_text_families_rows_with_different_adapters_equal_their_pipeline_with_the_adapter(
    key: str, model_dirs: dict[str, Path], tmp_path: Path
) -> None:
    """PixArt: against PixArtAlphaPipeline with the adapter merged. Wan: against WanPipeline after its own
    load_lora_weights of the same diffusers LoRA file (the reference the issue names)."""
    pipeline_class, requests = FAMILIES[key]
    model = load_model(key, model_dirs[key], CPU)
    storage = LocalStorage(tmp_path / "storage")
    applied = []
    for name, seed in (("one", 5), ("two", 6)):
        write_diffusers_adapter(tmp_path / name, model.transformer, seed, strength=2.0)
        info = store_adapter(storage, key, name, read_adapter(tmp_path / name), str(tmp_path / name))
        applied.append((AppliedLora.of(info, 1.0),))
    rows = [(requests[0], ()), (requests[1], applied[0]), (requests[3], applied[1])]
    adapters = row_adapters(AdapterBank(model.transformer, storage), [loras for _, loras in rows])
    frames = VIDEO_FRAMES if model.kind == "video" else 1
    pixels, _ = generate(
        model,
        [condition for (condition, _, _), _ in rows],
        [seed for (_, seed, _), _ in rows],
        [guidance for (_, _, guidance), _ in rows],
        STEPS,
        32,
        32,
        frames,
        adapters=adapters,
    )
    ours = pixels.numpy().astype(int)
    for k, ((condition, seed, guidance), loras) in enumerate(rows):
        pipe = pipeline_class.from_pretrained(model_dirs[key])
        pipe.set_progress_bar_config(disable=True)
        if loras:  # the adapter changes this row: the base pipeline's output is another picture
            base = _pipeline_output(pipe, condition, seed, guidance)
            assert np.abs(ours[k] - base).max() > 10, f"{key} row {k}: the adapter changed nothing"
            name = loras[0].name
            if key == "wan":
                pipe.load_lora_weights(str(tmp_path / name), weight_name="pytorch_lora_weights.safetensors")
            else:
                # a diffusers file without alpha scales by 1: merged() scales by ALPHA / RANK, so undo it
                pipe.transformer = merged(pipe.transformer, [(_weights_of(tmp_path / name), RANK / ALPHA)])
        expected = _pipeline_output(pipe, condition, seed, guidance)
        diff = np.abs(ours[k] - expected).max()
        assert diff <= MAX_PIXEL_DIFF, f"{key} row {k} is {diff}/255 off its pipeline with its adapter"


def _weights_of(path: Path) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    tensors = load_file(str(path / "pytorch_lora_weights.safetensors"))
    modules = {key.removeprefix("transformer.").rsplit(".lora_", 1)[0] for key in tensors}
    return {
        m: (tensors[f"transformer.{m}.lora_A.weight"], tensors[f"transformer.{m}.lora_B.weight"])
        for m in modules
    }


@pytest.mark.slow  # two video models, three sampling runs
def test_the_video_dit_mixes_adapters_per_row_across_its_frames(
    model_dirs: dict[str, Path], tmp_path: Path
) -> None:
    """The bundled video family's spatial blocks see one row per frame, its temporal blocks one per
    patch: each layer's rows are repeated per forward row. Against our sampler on a merged copy."""
    model = load_model("vid", model_dirs["vid"], CPU)
    reference_model = load_model("vid", model_dirs["vid"], CPU)
    storage = LocalStorage(tmp_path / "storage")
    weights = write_adapter(tmp_path / "move", model.transformer, 7, strength=1.0)
    info = store_adapter(storage, "vid", "move", read_adapter(tmp_path / "move"), str(tmp_path / "move"))
    rows = [
        (RowCondition(class_label=2), 31, ()),
        (RowCondition(class_label=2), 31, (AppliedLora.of(info, 1.0),)),
    ]
    adapters = row_adapters(AdapterBank(model.transformer, storage), [loras for *_, loras in rows])
    pixels, _ = generate(
        model, [c for c, *_ in rows], [s for _, s, _ in rows], [4.0, 4.0], STEPS, 32, 32, 5, adapters=adapters
    )
    ours = pixels.numpy().astype(int)
    plain, _ = generate(reference_model, [rows[0][0]], [31], [4.0], STEPS, 32, 32, 5)
    reference_model.transformer = merged(reference_model.transformer, [(weights, 1.0)])
    tinted, _ = generate(reference_model, [rows[1][0]], [31], [4.0], STEPS, 32, 32, 5)
    assert np.abs(ours[0] - plain.numpy().astype(int)[0]).max() <= MAX_PIXEL_DIFF
    assert np.abs(ours[1] - tinted.numpy().astype(int)[0]).max() <= MAX_PIXEL_DIFF
    assert np.abs(ours[1] - ours[0]).max() > 10
