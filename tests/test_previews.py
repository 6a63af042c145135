"""Previews: the predicted clean latent for each kind of scheduler, and the fitted latent-to-RGB map on
the bundled trained model (a red circle's preview is red) and on every family's tiny model."""

import base64
import io
from pathlib import Path

import pytest
import torch
from diffusers import DDIMScheduler, DPMSolverMultistepScheduler, UniPCMultistepScheduler
from PIL import Image

from dit_serve.contract import JobKind, JobRequest, OutputFormat
from models.families.base import RowCondition
from models.loading import load_model
from worker.clean import predicted_clean
from worker.previews import Previewer, fit_latent_rgb, previews_due
from worker.sampling import generate

BUNDLED = Path(__file__).resolve().parent.parent / "models" / "bundled"
SHAPE = (2, 4, 8, 8)


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction", "sample"])
@pytest.mark.parametrize("scheduler_class", [DDIMScheduler, DPMSolverMultistepScheduler])
def test_clean_latent_is_recovered_from_a_noised_one(scheduler_class: type, prediction_type: str) -> None:
    scheduler = scheduler_class(prediction_type=prediction_type)
    x0, eps = torch.randn(SHAPE), torch.randn(SHAPE)
    t = torch.tensor(600)
    alpha = scheduler.alphas_cumprod[t]
    x_t = alpha**0.5 * x0 + (1 - alpha) ** 0.5 * eps
    pred = {"epsilon": eps, "v_prediction": alpha**0.5 * eps - (1 - alpha) ** 0.5 * x0, "sample": x0}
    clean = predicted_clean(scheduler, x_t, pred[prediction_type], t, step_index=0)
    torch.testing.assert_close(clean, x0, atol=1e-4, rtol=1e-4)


def test_clean_latent_under_flow_matching() -> None:
    scheduler = UniPCMultistepScheduler(
        prediction_type="flow_prediction", use_flow_sigmas=True, flow_shift=3.0
    )
    scheduler.set_timesteps(10)
    x0, eps = torch.randn(SHAPE), torch.randn(SHAPE)
    step = 4
    sigma = float(scheduler.sigmas[step])
    x_t = (1 - sigma) * x0 + sigma * eps
    clean = predicted_clean(scheduler, x_t, eps - x0, scheduler.timesteps[step], step)
    torch.testing.assert_close(clean, x0, atol=1e-5, rtol=1e-5)


def test_previews_are_due_every_k_steps_but_not_after_the_last() -> None:
    request = JobRequest(
        kind=JobKind.IMAGE,
        model="m",
        class_labels=[0],
        n=1,
        width=32,
        height=32,
        num_inference_steps=10,
        guidance_scale=4,
        seed=0,
        output_format=OutputFormat.PNG,
        previews=5,
    )
    assert [step for step in range(1, 11) if previews_due(request, step, 10)] == [5]
    assert not any(previews_due(request.model_copy(update={"previews": None}), s, 10) for s in range(11))


@pytest.mark.slow
def test_the_bundled_models_red_circle_previews_red() -> None:
    """The map, fitted on the model's own samples, gives a finished red circle the decoder's colours."""
    model = load_model("image", BUNDLED / "dit-shapes-image", torch.device("cpu"))
    assert model.labels is not None
    red_circle = model.labels.index("red circle")
    latents_seen: list[torch.Tensor] = []
    pixels, _ = generate(
        model,
        [RowCondition(class_label=red_circle)] * 2,
        [11, 12],
        [4.0, 4.0],
        20,
        32,
        32,
        on_clean=lambda done, rows, clean: latents_seen.append(clean()) if done == 20 else None,
    )
    cells = fit_latent_rgb(model, 32, 32)(latents_seen[0]).float()  # (2, 8, 8, 3)
    decoded = torch.nn.functional.avg_pool2d(pixels.movedim(-1, 1).float(), 4).movedim(1, -1)  # (2, 8, 8, 3)
    assert (cells - decoded).abs().mean() / 255 < 0.12
    # The shape's cells (far from the light background) are red in the preview.
    shape = decoded.sum(-1) < decoded.sum(-1).mean()
    r, g, b = cells[shape].mean(0).tolist()
    assert r > g + 40 and r > b + 40


@pytest.mark.slow
@pytest.mark.parametrize("key", ["img", "vid", "pixart-sigma", "wan"])
def test_every_family_makes_decodable_previews(key: str, model_dirs: dict[str, Path]) -> None:
    model = load_model(key, model_dirs[key], torch.device("cpu"))
    spec = model.spec()
    width, height, frames = 32, 32, spec.defaults.num_frames or 1
    condition = RowCondition(class_label=0) if spec.conditioning == "class" else RowCondition(prompt="a cat")
    request = JobRequest(
        kind=spec.kind,
        model=key,
        prompt=condition.prompt,
        negative_prompt=None if condition.prompt is None else "",
        class_labels=None if condition.prompt else [0],
        n=1,
        width=width,
        height=height,
        num_inference_steps=4,
        guidance_scale=4,
        seed=0,
        output_format=OutputFormat.PNG if spec.kind == JobKind.IMAGE else OutputFormat.MP4,
        num_frames=frames,
        previews=2,
    )
    previewer = Previewer()
    events = []

    def on_clean(done: int, rows: torch.Tensor, clean: object) -> None:
        if previews_due(request, done, 4):
            events.extend(previewer.events(model, [("job", 0)], clean(), done, request))  # type: ignore[operator]

    generate(model, [condition], [0], [4.0], 4, width, height, frames, on_clean=on_clean)
    assert [event.step for event in events] == [2]
    image = Image.open(io.BytesIO(base64.b64decode(events[0].b64_json)))
    assert image.size == (events[0].width, events[0].height) == (width, height)


@pytest.mark.slow
def test_the_previews_benchmark_runs_in_a_small_setting() -> None:
    from bench.previews import run

    result = run(batch=2, steps=4, every=2, rounds=1)
    assert result["previews_per_batch"] == 2  # step 2 for both rows (none after the last step)
    assert float(result["slowdown"]) > 0 and len(result["plain_s"]) == len(result["previews_s"]) == 1  # type: ignore[arg-type]
