"""A job whose LoRA adapter cannot be loaded (removed from storage after the job was accepted, or damaged)
fails `lora_unavailable` alone, before its batch samples: its batch-mates run in the one batch they were
taken in, static or continuous, with no failed batch tried again apart and no continuous run restarted.
A real Worker in this process, on a real Redis, with the tiny DiT."""

from pathlib import Path

import pytest
from redis import Redis

from dit_serve.contract import JobKind
from dit_serve.jobs import LORA_UNAVAILABLE
from dit_serve.lora_registry import store_adapter
from dit_serve.loras import AppliedLora, read_adapter
from models.loading import load_model
from tests.test_lora import write_adapter
from tests.worker_harness import CPU, InProcessWorker, job_request

STEPS = 3


@pytest.mark.parametrize("continuous", [False, True], ids=["static", "continuous"])
def test_a_job_whose_adapter_cannot_load_fails_alone_and_its_batch_mates_run_once(
    redis: Redis, model_dirs: dict[str, Path], tmp_path: Path, continuous: bool
) -> None:
    # a transformer of its own: a worker's adapter bank is bound to the transformer it adapts
    model = load_model("img", model_dirs["img"], CPU)
    run = InProcessWorker(redis, {"img": model}, tmp_path / "out", continuous)
    adapters = {}
    for name, seed in (("red", 1), ("gone", 2), ("damaged", 3)):
        write_adapter(tmp_path / name, model.transformer, seed)
        info = store_adapter(run.storage, "img", name, read_adapter(tmp_path / name), str(tmp_path / name))
        adapters[name] = AppliedLora.of(info, 1.0)
    run.storage.delete(adapters["gone"].key)  # unregistered after its job was accepted
    run.storage.put(adapters["damaged"].key, b"not these weights", "application/octet-stream")

    def request(*names: str):  # type: ignore[no-untyped-def]
        return job_request(JobKind.IMAGE, STEPS, model="img").model_copy(
            update={"loras": [adapters[name] for name in names]}
        )

    plain = run.enqueue("plain", request())
    red = run.enqueue("red", request("red"))
    gone = run.enqueue("gone", request("red", "gone"))
    damaged = run.enqueue("damaged", request("damaged"))
    assert run.worker.run_once()

    assert [run.status(job) for job in (plain, red, gone, damaged)] == [
        "finished",
        "finished",
        "failed",
        "failed",
    ]
    for job in (gone, damaged):
        error = run.record(job).error
        assert error is not None and error.code == LORA_UNAVAILABLE
    # the batch-mates sampled once, together: one watchdog arming, no retry apart
    assert run.armed == [{plain, red}]
    assert run.record(plain).execution == run.record(red).execution
    assert run.output(plain) != run.output(red)  # the adapter that loaded was applied
    assert run.worker.ledger.held() == []
    assert (
        run.sample(
            "dit_jobs_finished_total", model="img", kind="image", status="failed", code=LORA_UNAVAILABLE
        )
        == 2
    )
