"""GET /v1/jobs/{id}/events against a real API and worker: the order and content of a job's events,
previews, the final event, resuming with Last-Event-ID, queued snapshots, and eta_s."""

import asyncio
import base64
import io
import threading
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from PIL import Image
from redis.asyncio import Redis as AsyncRedis

from app.job_stream import _read_events
from dit_serve.events import events_key
from dit_serve.jobs import ended_key
from tests.conftest import Service, paused, running_service
from tests.sse import Event, read_events

STEPS = 6
PREVIEW_EVERY = 2


@pytest.fixture(scope="module")
def events_service(
    redis_url: str, model_dirs: dict[str, Path], tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Service]:
    with running_service(redis_url, tmp_path_factory.mktemp("events"), {"img": model_dirs["img"]}) as svc:
        yield svc


def _submit(client: httpx.Client, **fields: object) -> str:
    body = {"class_labels": [1, 2], "n": 2, "seed": 5, "num_inference_steps": STEPS, **fields}
    response = client.post("/v1/images", json=body)
    assert response.status_code == 202, response.text
    return str(response.json()["id"])


def check_job_events(events: list[Event], job_id: str, outputs: int, steps: int, every: int) -> None:
    """What every job's stream must hold: started, each step's progress in order, previews of every
    output every `every` steps (never after the last), then one final completed event with the job."""
    names = [event.name for event in events]
    assert names[-1] == "completed" and names.count("completed") == 1
    assert "started" in names and names.index("started") < names.index("progress")
    progress = [event.data for event in events if event.name == "progress"]
    assert [p["step"] for p in progress] == list(range(1, steps + 1))
    assert all(p["steps"] == steps and p["id"] == job_id for p in progress)
    assert [p["percent"] for p in progress] == sorted(p["percent"] for p in progress)
    previews = [event.data for event in events if event.name == "preview"]
    due = [step for step in range(every, steps, every)]
    assert sorted((p["step"], p["index"]) for p in previews) == [(s, k) for s in due for k in range(outputs)]
    for preview in previews:
        image = Image.open(io.BytesIO(base64.b64decode(preview["b64_json"])))
        assert image.format == "PNG" and image.size == (preview["width"], preview["height"])
    final = events[-1].data
    assert final["id"] == job_id and final["status"] == "completed" and len(final["outputs"]) == outputs
    assert final["eta_s"] is None
    ids = [event.id for event in events if event.id is not None]
    assert (
        ids == sorted(ids, key=lambda i: tuple(map(int, i.split("-")))) and len(set(ids[:-1])) == len(ids) - 1
    )


def test_a_job_streams_its_steps_previews_and_end(events_service: Service) -> None:
    with events_service.client() as client:
        job_id = _submit(client, previews=PREVIEW_EVERY)
        events = list(read_events(client, f"/v1/jobs/{job_id}/events"))
        check_job_events(events, job_id, outputs=2, steps=STEPS, every=PREVIEW_EVERY)
        # Progress after the first step carries an ETA from the job's own pace.
        assert all(
            e.data["eta_s"] is not None and e.data["eta_s"] >= 0 for e in events if e.name == "progress"
        )
        # The stream of an ended job replays it and ends at once; resuming skips what was seen.
        assert [e.name for e in read_events(client, f"/v1/jobs/{job_id}/events")] == [e.name for e in events]
        resume_from = events[3]
        resumed = list(
            read_events(client, f"/v1/jobs/{job_id}/events", {"Last-Event-ID": str(resume_from.id)})
        )
        assert [(e.name, e.data) for e in resumed[:-1]] == [(e.name, e.data) for e in events[4:-1]]
        assert resumed[-1].name == "completed"


def test_without_previews_no_preview_events(events_service: Service) -> None:
    with events_service.client() as client:
        job_id = _submit(client)
        events = list(read_events(client, f"/v1/jobs/{job_id}/events"))
        assert "preview" not in {e.name for e in events} and events[-1].name == "completed"


def test_a_queued_job_streams_its_position_then_runs(events_service: Service) -> None:
    with events_service.client() as client:
        events: list[Event] = []
        with paused(events_service.workers[0]):
            first, second = _submit(client), _submit(client)
            reader = threading.Thread(
                target=lambda: events.extend(read_events(client, f"/v1/jobs/{second}/events"))
            )
            reader.start()
            body = client.get(f"/v1/jobs/{second}").json()
            assert body["status"] == "queued" and body["queue_position"] == 1 and "eta_s" in body
        reader.join(timeout=120)
        assert events[0].name == "queued" and events[0].data["queue_position"] == 1
        assert events[-1].name == "completed" and events[-1].data["id"] == second
        assert client.get(f"/v1/jobs/{first}", params={"wait": 30}).json()["status"] == "completed"


def test_a_canceled_job_ends_its_stream_with_canceled(events_service: Service) -> None:
    with events_service.client() as client:
        with paused(events_service.workers[0]):
            job_id = _submit(client)
            assert client.delete(f"/v1/jobs/{job_id}").status_code == 200
        events = list(read_events(client, f"/v1/jobs/{job_id}/events"))
        assert [e.name for e in events] == ["canceled"] and events[0].data["status"] == "canceled"


def test_unknown_jobs_and_bad_event_ids_are_refused(events_service: Service) -> None:
    with events_service.client() as client:
        missing = client.get("/v1/jobs/no-such-job/events")
        assert missing.status_code == 404 and missing.json()["error"]["code"] == "job_not_found"
        job_id = _submit(client)
        bad = client.get(f"/v1/jobs/{job_id}/events", headers={"Last-Event-ID": "yesterday"})
        assert bad.status_code == 422 and "Last-Event-ID" in bad.json()["error"]["message"]


def test_a_wait_for_events_ends_when_the_job_ends_not_when_the_wait_runs_out(redis_url: str) -> None:
    """The stream's wait watches the job's `ended` list beside its events: a job that ends with no
    event after its last step (its outputs being stored) gets its final event at once, not after the
    wait. With a 60 s wait and a 20 s limit here, only the end can have woken it."""

    async def scenario() -> tuple[object, object]:
        waits = AsyncRedis.from_url(redis_url)
        try:
            await waits.delete(events_key("j1"), ended_key("j1"))
            await waits.xadd(events_key("j1"), {"type": "progress", "payload": "{}"})
            seen = await _read_events(waits, "j1", "0", None)  # the first read does not wait
            cursor = seen[0][1][-1][0].decode()

            async def end_soon() -> None:
                await asyncio.sleep(0.2)
                await waits.rpush(ended_key("j1"), "completed")

            ender = asyncio.ensure_future(end_soon())
            after_end = await asyncio.wait_for(_read_events(waits, "j1", cursor, 60_000), timeout=20)
            await ender
            # written before the end, read after it: still delivered
            await waits.xadd(events_key("j1"), {"type": "progress", "payload": "{}"})
            late = await asyncio.wait_for(_read_events(waits, "j1", cursor, 60_000), timeout=20)
            return after_end, late
        finally:
            await waits.delete(events_key("j1"), ended_key("j1"))
            await waits.aclose()

    after_end, late = asyncio.run(scenario())
    assert not after_end  # woken by the end, with nothing new to read
    assert late and len(late[0][1]) == 1  # type: ignore[index,arg-type]
