"""LoRA end to end: a real API and worker (auth on), adapters registered by the worker's --lora and at
run time by an admin's POST /v1/loras, jobs naming different adapters sharing one batch, and the 4xx
answers for adapters that do not exist, do not fit, or are not an admin's to register."""

import base64
import io
import json
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import numpy as np
import openai
import pytest
import torch
from openai import OpenAI
from PIL import Image
from redis import Redis
from safetensors.torch import save_file

from dit_serve.jobs import record_key
from models.loading import load_model
from tests.conftest import Service, running_service
from tests.test_auth import keys_cli
from tests.test_lora import write_adapter

# The SDK marks its video API (Sora) deprecated; the calls still work, and are what is tested here.
pytestmark = [pytest.mark.slow, pytest.mark.filterwarnings("ignore:The Sora API:DeprecationWarning")]

CPU = torch.device("cpu")
JOB = {"model": "img", "class_labels": [3], "seed": 21, "num_inference_steps": 4}


@pytest.fixture(scope="module")
def lora_service(
    redis_url: str, model_dirs: dict[str, Path], tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[Service, Path, dict[str, str]]]:
    root = tmp_path_factory.mktemp("lora-service")
    base = load_model("img", model_dirs["img"], CPU).transformer
    for name, seed in (("red", 1), ("blue", 2), ("green", 3), ("green2", 4)):
        write_adapter(root / name, base, seed)
    write_adapter(root / "wave", load_model("vid", model_dirs["vid"], CPU).transformer, 5)
    flags = json.dumps([f"img:red={root / 'red'}", f"img:blue={root / 'blue'}", f"vid:wave={root / 'wave'}"])
    # the fill window stays open a second, so that jobs posted one after another share a batch
    window = {"DIT_MAX_WAIT_MS": "1000", "DIT_BATCH_GAP_MS": "1000", "DIT_MAX_FILL_MS": "1000"}
    models = {"img": model_dirs["img"], "vid": model_dirs["vid"]}
    with running_service(redis_url, root, models, {"DIT_AUTH": "on"}, DIT_LORA=flags, **window) as svc:
        keys = {}
        for name, admin in (("ops", True), ("app", False)):
            made = keys_cli(redis_url, "create", name, "--json", *(["--admin"] if admin else []))
            assert made.returncode == 0, made.stderr
            keys[name] = json.loads(made.stdout)["key"]
        yield svc, root, keys


def _client(svc: Service, key: str) -> httpx.Client:
    return httpx.Client(base_url=svc.base_url, timeout=90, headers={"Authorization": f"Bearer {key}"})


def _png(http: httpx.Client, job: dict) -> np.ndarray:
    data = http.get(job["outputs"][0]["url"]).content
    return np.asarray(Image.open(io.BytesIO(data)).convert("RGB")).astype(int)


def _run(http: httpx.Client, body: dict) -> dict:
    posted = http.post("/v1/images", json=body)
    assert posted.status_code == 202, posted.text
    return http.get(f"/v1/jobs/{posted.json()['id']}", params={"wait": 60}).json()


def test_jobs_with_different_adapters_share_one_batch(lora_service: tuple[Service, Path, dict]) -> None:
    svc, _root, keys = lora_service
    with _client(svc, keys["app"]) as http:
        (model,) = [m for m in http.get("/v1/models").json()["data"] if m["name"] == "img"]
        assert [lora["name"] for lora in model["loras"]] == ["blue", "red"]
        assert all(lora["source"] == "" for lora in model["loras"])  # server paths are for admins
        assert all(
            lora["rank"] == 4 and lora["layers"] > 0 and len(lora["digest"]) == 64 for lora in model["loras"]
        )
        bodies = [
            JOB,
            {**JOB, "loras": [{"name": "red"}]},
            {**JOB, "loras": [{"name": "blue", "scale": 1.5}]},
            {**JOB, "loras": [{"name": "red", "scale": 0.5}, {"name": "blue"}]},
        ]
        with ThreadPoolExecutor(len(bodies)) as pool:
            jobs = list(pool.map(lambda body: _run(http, body), bodies))
        assert [job["status"] for job in jobs] == ["completed"] * 4, jobs
        assert (
            jobs[3]["request"]["loras"][0]["name"] == "red" and jobs[3]["request"]["loras"][0]["scale"] == 0.5
        )
        pictures = [_png(http, job) for job in jobs]
    redis = Redis.from_url(svc.redis_url)
    executions = {redis.hget(record_key(job["id"]), "execution") for job in jobs}
    assert len(executions) == 1, "the four jobs ran in more than one batch"
    # each adapter (and each mix) changed the same seed's picture, and differently
    for k in range(1, 4):
        assert np.abs(pictures[k] - pictures[0]).max() > 10, f"job {k}'s adapters changed nothing"
    assert np.abs(pictures[1] - pictures[2]).max() > 10
    assert "Traceback" not in svc.worker_log()  # no batch failed and was retried apart


def test_an_unknown_adapter_or_a_bad_list_is_refused_naming_the_valid_ones(
    lora_service: tuple[Service, Path, dict],
) -> None:
    svc, _root, keys = lora_service
    with _client(svc, keys["app"]) as http:
        unknown = http.post("/v1/images", json={**JOB, "loras": [{"name": "purple"}]})
        assert unknown.status_code == 422 and unknown.json()["error"]["code"] == "unknown_lora"
        assert (
            "'purple'" in unknown.json()["error"]["message"]
            and "blue, red" in unknown.json()["error"]["message"]
        )
        for loras in (
            [{"name": "red", "scale": 2.5}],
            [{"name": "red"}, {"name": "red"}],
            [{"name": n} for n in ("a", "b", "c", "d")],
            [{"name": "../etc"}],
        ):
            bad = http.post("/v1/images", json={**JOB, "loras": loras})
            assert bad.status_code == 422 and bad.json()["error"]["code"] == "invalid_request", (
                loras,
                bad.text,
            )


def test_an_admin_registers_and_removes_an_adapter_at_run_time(
    lora_service: tuple[Service, Path, dict],
) -> None:
    svc, root, keys = lora_service
    green = {"model": "img", "name": "green", "source": str(root / "green")}
    with _client(svc, keys["app"]) as app, _client(svc, keys["ops"]) as ops:
        refused = app.post("/v1/loras", json=green)
        assert refused.status_code == 403 and refused.json()["error"]["code"] == "admin_only"
        made = ops.post("/v1/loras", json=green)
        assert made.status_code == 201, made.text
        assert ops.post("/v1/loras", json=green).status_code == 200  # the same weights again: as it is
        other = ops.post("/v1/loras", json={**green, "source": str(root / "green2")})
        assert other.status_code == 409 and other.json()["error"]["code"] == "lora_exists"
        assert "green" in [lora["name"] for lora in app.get("/v1/loras").json()["data"]]
        # the worker has never seen it: it loads it from storage on first use
        base, tinted = _run(app, JOB), _run(app, {**JOB, "loras": [{"name": "green"}]})
        assert tinted["status"] == "completed", tinted
        assert np.abs(_png(app, tinted) - _png(app, base)).max() > 10
        removed = ops.delete("/v1/loras/img/green")
        assert removed.status_code == 200 and removed.json()["digest"] == made.json()["digest"]
        gone = app.post("/v1/images", json={**JOB, "loras": [{"name": "green"}]})
        assert gone.status_code == 422 and gone.json()["error"]["code"] == "unknown_lora"
        assert ops.delete("/v1/loras/img/green").status_code == 404


def test_an_adapter_that_does_not_fit_or_does_not_parse_is_refused(
    lora_service: tuple[Service, Path, dict], tmp_path: Path
) -> None:
    svc, _root, keys = lora_service
    misfit = tmp_path / "misfit"
    misfit.mkdir()
    save_file(
        {"base_model.model.no.such.layer.lora_A.weight": torch.zeros(2, 8),
         "base_model.model.no.such.layer.lora_B.weight": torch.zeros(8, 2)},
        str(misfit / "adapter_model.safetensors"),
    )  # fmt: skip
    (misfit / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 2, "lora_alpha": 2}))
    with _client(svc, keys["ops"]) as ops:
        answer = ops.post("/v1/loras", json={"model": "img", "name": "misfit", "source": str(misfit)})
        assert answer.status_code == 422 and answer.json()["error"]["code"] == "lora_does_not_fit", (
            answer.text
        )
        assert "no.such.layer" in answer.json()["error"]["message"]
        missing = ops.post("/v1/loras", json={"model": "img", "name": "x", "source": str(tmp_path / "none")})
        assert missing.status_code == 422 and missing.json()["error"]["code"] == "invalid_lora"
        unserved = ops.post("/v1/loras", json={"model": "nope", "name": "x", "source": str(misfit)})
        assert unserved.status_code == 422 and unserved.json()["error"]["code"] == "unknown_model"


def test_the_openai_sdk_applies_adapters_to_images_and_videos(
    lora_service: tuple[Service, Path, dict],
) -> None:
    """`extra_body={"loras": [...]}`: JSON for images; for videos the SDK's multipart form fields
    (loras[][name], loras[][scale]), paired up again by the API."""
    svc, _root, keys = lora_service
    sdk = OpenAI(base_url=f"{svc.base_url}/v1", api_key=keys["app"], max_retries=0)
    steps = {"num_inference_steps": 4, "seed": 21}
    plain = sdk.images.generate(model="img", prompt="red circle", extra_body=steps)
    tinted = sdk.images.generate(
        model="img", prompt="red circle", extra_body={**steps, "loras": [{"name": "red", "scale": 0.5}]}
    )
    assert plain.data and tinted.data and plain.data[0].b64_json and tinted.data[0].b64_json
    with _client(svc, keys["app"]) as http:
        job = http.get(f"/v1/jobs/{tinted.id}").json()
        assert [(lora["name"], lora["scale"]) for lora in job["request"]["loras"]] == [("red", 0.5)]
        assert np.abs(_decoded(tinted.data[0].b64_json) - _decoded(plain.data[0].b64_json)).max() > 10
        video = sdk.videos.create(
            model="vid",
            prompt="red circle moving up",
            extra_body={"num_inference_steps": 2, "loras": [{"name": "wave", "scale": 0.7}]},
        )
        ended = http.get(f"/v1/jobs/{video.id}", params={"wait": 60}).json()
        assert ended["status"] == "completed", ended
        assert [(lora["name"], lora["scale"]) for lora in ended["request"]["loras"]] == [("wave", 0.7)]
    for call in (
        lambda: sdk.images.generate(
            model="img", prompt="red circle", extra_body={"loras": [{"name": "wave"}]}
        ),
        lambda: sdk.videos.create(
            model="vid", prompt="red circle moving up", extra_body={"loras": [{"name": "red"}]}
        ),
    ):
        with pytest.raises(openai.BadRequestError) as refused:
            call()
        assert refused.value.code == "unknown_lora" and refused.value.param == "loras"
    with pytest.raises(openai.BadRequestError) as unpaired:  # names and scales are paired by order
        sdk.videos.create(
            model="vid",
            prompt="red circle moving up",
            extra_body={"loras": [{"name": "wave"}, {"name": "x", "scale": 1}]},
        )
    assert unpaired.value.param == "loras[][scale]"


def _decoded(b64: str) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(base64.b64decode(b64))).convert("RGB")).astype(int)
