"""What previews cost a batch: `python -m bench.previews`.

Times the worker's sampler (`worker.sampling.generate`) on one batch of the bundled image model, with
and without previews every k steps, made the way a worker makes them (worker/previews.py: the
predicted clean latent through the fitted latent-to-RGB map, upscaled and PNG-encoded, for every row
due). The two runs alternate, `--rounds` times each, after one warm-up of each (the warm-up fits the
map, which a worker does once per model). Reported: seconds per batch of each (median), and the
ratio. The Redis write of the preview events is not included (one pipelined XADD per step).
"""

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

from dit_serve.contract import JobKind, JobRequest, OutputFormat
from models.families.base import RowCondition
from models.loading import load_model
from worker.previews import Previewer, previews_due
from worker.sampling import generate

BUNDLED_IMAGE = Path(__file__).resolve().parent.parent / "models" / "bundled" / "dit-shapes-image"


def run(batch: int, steps: int, every: int, rounds: int) -> dict[str, object]:
    model = load_model("dit-shapes-image", BUNDLED_IMAGE, torch.device("cpu"))
    width, height = (int(side) for side in model.spec().default_size.split("x"))
    labels = [k % (model.spec().num_classes or 1) for k in range(batch)]
    request = JobRequest(
        kind=JobKind.IMAGE,
        model=model.name,
        class_labels=labels,
        n=batch,
        width=width,
        height=height,
        num_inference_steps=steps,
        guidance_scale=model.spec().defaults.guidance_scale,
        seed=0,
        output_format=OutputFormat.PNG,
        previews=every,
    )
    previewer = Previewer()
    made = [0]

    def on_clean(done: int, rows: torch.Tensor, clean) -> None:  # type: ignore[no-untyped-def]
        if previews_due(request, done, steps):
            outputs = [("job", int(row)) for row in rows.tolist()]
            made[0] += len(previewer.events(model, outputs, clean(), done, request))

    def one(with_previews: bool) -> float:
        start = time.perf_counter()
        generate(
            model,
            [RowCondition(class_label=label) for label in labels],
            list(range(batch)),
            [request.guidance_scale] * batch,
            steps,
            width,
            height,
            on_clean=on_clean if with_previews else None,
        )
        return time.perf_counter() - start

    one(False), one(True)  # warm-up; the second fits the latent-to-RGB map
    made[0] = 0
    plain, previewed = [], []
    for _ in range(rounds):
        plain.append(one(False))
        previewed.append(one(True))
    plain_s, previewed_s = statistics.median(plain), statistics.median(previewed)
    return {
        "model": model.name,
        "batch": batch,
        "steps": steps,
        "previews_every": every,
        "rounds": rounds,
        "previews_per_batch": made[0] // rounds,
        "plain_s": [round(s, 4) for s in plain],
        "previews_s": [round(s, 4) for s in previewed],
        "plain_median_s": round(plain_s, 4),
        "previews_median_s": round(previewed_s, 4),
        "slowdown": round(previewed_s / plain_s, 4),
        "torch_threads": torch.get_num_threads(),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--steps", type=int, default=25)
    parser.add_argument("--every", type=int, default=5, help="a preview every this many steps")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    result = run(args.batch, args.steps, args.every, args.rounds)
    print(json.dumps(result, indent=2))
    if args.json:
        args.json.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
