"""LoRA adapters mixed in one batch: `dit-serve bench lora`.

The bundled image model (or `--model-dir`) samples 16 rows (`--rows`) in the service's sampler
(worker.sampling.generate with the worker's AdapterBank), three ways, side by side in one run:

- `one adapter`: all rows share one adapter;
- `mixed`: the rows spread over `--adapters` different adapters (4 by default), in one batch;
- `separate`: the same rows as one batch per adapter, one after another (what a server that splits
  step batches by adapter does).

Also `base` (no adapter), and `base, separate`: base rows in the separate way's batches, which shows
what batching itself gains on the machine (about the most `mixed ÷ separate` can reach there). The
adapters are random LoRAs of rank `--rank` on every attention projection and feed-forward layer,
registered into a temporary local storage and loaded before timing. Rounds run the ways in turn
(`--rounds`), and each way's images/s is its median round. The issue's goals: mixed ≥ 0.85× one
adapter, and ≥ 2× separate.
"""

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import torch
from safetensors.torch import save_file

from dit_serve.lora_registry import store_adapter
from dit_serve.loras import AppliedLora, read_adapter
from dit_serve.storage import LocalStorage
from models.bundled import IMAGE_MODEL_DIR
from models.loading import LoadedModel, RowCondition, load_model
from worker.lora import AdapterBank, adaptable_layers, row_adapters
from worker.sampling import generate

TARGETS = ("to_q", "to_k", "to_v", "to_out.0", "ff.net.0.proj", "ff.net.2")
GOAL_VS_ONE, GOAL_VS_SEPARATE = 0.85, 2.0


def write_random_adapter(path: Path, model: LoadedModel, rank: int, seed: int) -> None:
    """A PEFT adapter directory with random weights on the targeted layers."""
    generator = torch.Generator().manual_seed(seed)
    tensors = {}
    for module, (in_features, out_features) in adaptable_layers(model.transformer).items():
        if module.endswith(TARGETS):
            a = torch.randn(rank, in_features, generator=generator) / in_features**0.5
            tensors[f"base_model.model.{module}.lora_A.weight"] = a
            tensors[f"base_model.model.{module}.lora_B.weight"] = (
                torch.randn(out_features, rank, generator=generator) * 0.1
            )
    path.mkdir(parents=True)
    save_file(tensors, str(path / "adapter_model.safetensors"))
    (path / "adapter_config.json").write_text(
        json.dumps({"peft_type": "LORA", "r": rank, "lora_alpha": rank})
    )


def sample(model: LoadedModel, bank: AdapterBank, rows: list[tuple[AppliedLora, ...]], steps: int) -> None:
    size = model.spec().default_size.split("x")
    generate(
        model,
        [RowCondition(class_label=k % 8) for k in range(len(rows))],
        list(range(len(rows))),
        [4.0] * len(rows),
        steps,
        int(size[0]),
        int(size[1]),
        adapters=row_adapters(bank, rows),
    )


def run(args: argparse.Namespace) -> dict:
    model = load_model("bench", args.model_dir, torch.device(args.device))
    with tempfile.TemporaryDirectory(prefix="dit-bench-lora-") as tmp:
        storage = LocalStorage(Path(tmp) / "storage")
        adapters = []
        for k in range(args.adapters):
            path = Path(tmp) / f"a{k}"
            write_random_adapter(path, model, args.rank, seed=k)
            info = store_adapter(storage, "bench", f"a{k}", read_adapter(path), str(path))
            adapters.append(AppliedLora.of(info, 1.0))
        bank = AdapterBank(model.transformer, storage)
        per = args.rows // args.adapters
        ways = {
            "base": [[()] * args.rows],
            "one adapter": [[(adapters[0],)] * args.rows],
            "mixed": [[(adapters[k // per],) for k in range(args.rows)]],
            "separate": [[(adapter,)] * per for adapter in adapters],
            # what batching itself gains on this machine: base rows in the separate way's batch sizes
            "base, separate": [[()] * per for _ in adapters],
        }
        with torch.inference_mode():
            for batches in ways.values():  # load every adapter, warm every shape
                for rows in batches:
                    sample(model, bank, rows, 2)
            seconds: dict[str, list[float]] = {way: [] for way in ways}
            for _ in range(args.rounds):
                for way, batches in ways.items():
                    start = time.perf_counter()
                    for rows in batches:
                        sample(model, bank, rows, args.steps)
                    seconds[way].append(time.perf_counter() - start)
    images_per_s = {way: args.rows / statistics.median(times) for way, times in seconds.items()}
    mixed = images_per_s["mixed"]
    return {
        "rows": args.rows,
        "adapters": args.adapters,
        "rank": args.rank,
        "steps": args.steps,
        "rounds": args.rounds,
        "device": args.device,
        "images_per_s": {way: round(value, 3) for way, value in images_per_s.items()},
        "seconds": {way: [round(t, 3) for t in times] for way, times in seconds.items()},
        "mixed_over_one": round(mixed / images_per_s["one adapter"], 3),
        "mixed_over_separate": round(mixed / images_per_s["separate"], 3),
        "batching_gain": round(images_per_s["base"] / images_per_s["base, separate"], 3),
    }


def format_table(record: dict) -> str:
    lines = ["| way | images/s | round seconds |", "|---|---|---|"]
    for way, value in record["images_per_s"].items():
        lines.append(f"| {way} | {value} | {', '.join(map(str, record['seconds'][way]))} |")
    lines.append("")
    lines.append(
        f"mixed ÷ one adapter: {record['mixed_over_one']} (goal ≥ {GOAL_VS_ONE}); "
        f"mixed ÷ separate: {record['mixed_over_separate']} (goal ≥ {GOAL_VS_SEPARATE}); "
        f"base ÷ base in separate batches (what batching gains here): {record['batching_gain']}"
    )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="dit-serve bench lora", description=__doc__.split("\n\n")[0])
    parser.add_argument("--model-dir", type=Path, default=IMAGE_MODEL_DIR)
    parser.add_argument("--rows", type=int, default=16)
    parser.add_argument("--adapters", type=int, default=4)
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--steps", type=int, default=25)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--json", type=Path, default=Path("bench/results/lora.json"))
    args = parser.parse_args(argv)
    if args.rows % args.adapters:
        parser.error("--rows must be a multiple of --adapters")
    record = run(args)
    print(format_table(record))
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(record, indent=2) + "\n")


if __name__ == "__main__":
    main()
