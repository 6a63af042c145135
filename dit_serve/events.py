"""A job's live events: what workers append while it runs, and what `GET /v1/jobs/{id}/events` streams.

Workers append `started`, `progress` and `preview` events to the job's Redis stream
(`dit:events:<id>`, capped and expiring). The API's Server-Sent Events route reads that stream from
the client's `Last-Event-ID` on, adds what only it knows (`queued` with the queue position and ETA,
read from the job's state) and ends with one final event carrying the job object once the job has
ended. Each SSE event's `id` is the id of the last stream entry delivered, so a client that
reconnects with `Last-Event-ID` misses nothing and sees nothing twice (except `queued`, a snapshot).

Event names and payloads (JSON in the SSE `data:` field):
- `queued`: {"id", "status": "queued", "queue_position", "eta_s"}, at the start and on each change;
- `started`: {"id", "status": "in_progress", "started_at"};
- `progress`: {"id", "step", "steps", "percent", "eta_s"} after every denoising step;
- `preview`: {"id", "step", "steps", "index", "width", "height", "content_type", "b64_json"} every
  `previews` steps, when the request asked for them: a small PNG per output, decoded cheaply (a
  linear map from latent channels to RGB) from the predicted clean latent;
- `completed` | `failed` | `canceled`: the job object, as `GET /v1/jobs/{id}` answers it; the stream
  then ends.

This module is imported by the API, so it must not import torch or the web stack.
"""

from enum import StrEnum
from typing import Any

from pydantic import BaseModel, ConfigDict
from redis import Redis
from redis.client import Pipeline

from dit_serve.jobs import KEY_PREFIX

EVENTS_MAXLEN = 500  # entries kept per job (approximately): every step of a long job, and its previews
EVENTS_TTL_S = 3600  # a job's stream is kept this long after its last event
PAYLOAD_FIELD = "data"  # each stream entry: {type, data (JSON)}
TYPE_FIELD = "type"


class EventType(StrEnum):
    QUEUED = "queued"  # the API's, from the job's state
    STARTED = "started"
    PROGRESS = "progress"
    PREVIEW = "preview"
    COMPLETED = "completed"  # the final events are the API's, from the job's state
    FAILED = "failed"
    CANCELED = "canceled"


FINAL_EVENTS = frozenset({EventType.COMPLETED, EventType.FAILED, EventType.CANCELED})


class StartedEvent(BaseModel):
    model_config = ConfigDict(frozen=True)

    id: str
    status: str = "in_progress"
    started_at: float


class ProgressEvent(BaseModel):
    model_config = ConfigDict(frozen=True)

    id: str
    step: int
    steps: int
    percent: int
    eta_s: float | None = None  # the API fills it in


class PreviewEvent(BaseModel):
    model_config = ConfigDict(frozen=True)

    id: str
    step: int
    steps: int
    index: int  # which output of the job
    width: int
    height: int
    content_type: str = "image/png"
    b64_json: str


class QueuedEvent(BaseModel):
    model_config = ConfigDict(frozen=True)

    id: str
    status: str = "queued"
    queue_position: int | None
    eta_s: float | None


WorkerEvent = StartedEvent | ProgressEvent | PreviewEvent
EVENT_TYPES: dict[type[BaseModel], EventType] = {
    StartedEvent: EventType.STARTED,
    ProgressEvent: EventType.PROGRESS,
    PreviewEvent: EventType.PREVIEW,
}


def events_key(job_id: str) -> str:
    return f"{KEY_PREFIX}:events:{job_id}"


def append(pipe: Redis | Pipeline, event: WorkerEvent) -> None:
    """Queue the XADD of one worker event (and the stream's cap and expiry) on `pipe`."""
    key = events_key(event.id)
    pipe.xadd(
        key,
        {TYPE_FIELD: EVENT_TYPES[type(event)].value, PAYLOAD_FIELD: event.model_dump_json()},
        maxlen=EVENTS_MAXLEN,
        approximate=True,
    )
    pipe.expire(key, EVENTS_TTL_S)


def parse_entries(reply: Any) -> list[tuple[str, str, str]]:
    """An XREAD reply on one job's stream as (entry id, event type, JSON payload), oldest first."""
    entries = reply[0][1] if reply else []
    return [
        (entry_id.decode(), fields[TYPE_FIELD.encode()].decode(), fields[PAYLOAD_FIELD.encode()].decode())
        for entry_id, fields in entries
    ]
