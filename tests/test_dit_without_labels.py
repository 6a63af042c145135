"""A DiT directory written by DiTPipeline.save_pretrained (no id2label) is served with class ids."""

from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from diffusers import DiTPipeline

from models.loading import load_model
from tests.conftest import Service, running_service, wait_for_status

CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def saved_dit(model_dirs: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> Path:
    """What diffusers' own DiTPipeline.save_pretrained writes: a model_index.json without id2label."""
    path = tmp_path_factory.mktemp("saved") / "dit"
    DiTPipeline.from_pretrained(model_dirs["img"]).save_pretrained(path)
    assert "id2label" not in (path / "model_index.json").read_text()
    return path


def test_a_saved_pipeline_loads_and_describes_class_ids(saved_dit: Path) -> None:
    model = load_model("plain", saved_dit, CPU)
    spec = model.spec()
    null_class = int(model.transformer.config.num_embeds_ada_norm)
    assert (spec.conditioning, spec.labels, spec.num_classes) == ("class", None, null_class)


@pytest.fixture(scope="module")
def plain_service(
    redis_url: str, saved_dit: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Service]:
    models = {"plain": saved_dit}
    with running_service(
        redis_url, tmp_path_factory.mktemp("plain"), models, {"DIT_DEFAULT_MODEL": "plain"}
    ) as svc:
        yield svc


@pytest.mark.slow
def test_class_labels_work_and_a_prompt_gets_advice(plain_service: Service) -> None:
    with plain_service.client() as client:
        [model] = client.get("/v1/models").json()["data"]
        assert (model["labels"], model["num_classes"]) == (None, 1000)
        refused = client.post("/v1/images", json={"prompt": "red circle"})
        assert refused.status_code == 422
        error = refused.json()["error"]
        assert error["code"] == "no_label_names" and "send class_labels" in error["message"]
        out_of_range = client.post("/v1/images", json={"class_labels": [1000]})
        assert out_of_range.status_code == 422 and "0..999" in out_of_range.json()["error"]["message"]
        accepted = client.post("/v1/images", json={"class_labels": [207], "num_inference_steps": 3})
        assert accepted.status_code == 202, accepted.text
        job = wait_for_status(client, accepted.json()["id"], {"completed", "failed"})
        assert job["status"] == "completed" and job["request"]["class_labels"] == [207]
        png = client.get(job["outputs"][0]["url"])
        assert png.status_code == 200 and png.content.startswith(b"\x89PNG")
