"""GET /v1/jobs/{id}/events: a job's live progress as Server-Sent Events (dit_serve/events.py).

The stream replays the job's worker events after the client's `Last-Event-ID` (all of them without
one), adds `queued` snapshots while the job waits, and ends with one final event carrying the job
object. Blocking reads go through the app's asyncio Redis client, so an open stream holds no thread.
"""

import re
import time
from collections.abc import AsyncIterator
from typing import Annotated

from fastapi import APIRouter, Header, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import StreamingResponse
from redis import Redis

from app.auth import Caller, CallerDep
from app.deps import RedisDep
from app.errors import Gone, InvalidRequest, NotFound
from app.openapi import (
    INVALID_PARAMETER,
    JOB_EXPIRED,
    JOB_NOT_FOUND,
    JOB_SCHEMA_TOO_NEW,
    REDIS_UNAVAILABLE,
    UNAUTHORIZED,
    error_responses,
)
from app.views import job_body
from dit_serve.eta import running_eta_s
from dit_serve.events import EventType, ProgressEvent, QueuedEvent, StartedEvent, events_key
from dit_serve.jobs import ENDED_STATUSES, JobStatus
from dit_serve.schemas import JobBody

router = APIRouter(prefix="/v1/jobs", tags=["jobs"])

BLOCK_MS = 1000  # wait this long for worker events before looking at the job's state again
KEEP_ALIVE_S = 15.0  # a comment line this often keeps proxies from closing a quiet stream
STREAM_ID = re.compile(r"^\d{1,20}-\d{1,20}$")  # a Redis stream entry id, as our events' ids are
START = "0"  # before every entry
EVENT_STREAM = "text/event-stream"


def sse(event: str, data: str, event_id: str | None = None) -> str:
    """One Server-Sent Event; `data` is one line of JSON."""
    head = f"id: {event_id}\n" if event_id is not None and event_id != START else ""
    return f"{head}event: {event}\ndata: {data}\n\n"


@router.get(
    "/{job_id}/events",
    response_class=StreamingResponse,
    responses={
        200: {
            "description": "Server-Sent Events: `queued`, `started`, `progress`, `preview`, then one of "
            "`completed`, `failed` or `canceled` with the job object, after which the stream ends",
            "content": {EVENT_STREAM: {"schema": {"type": "string"}}},
        },
        **error_responses(
            UNAUTHORIZED, REDIS_UNAVAILABLE, JOB_SCHEMA_TOO_NEW, JOB_NOT_FOUND, JOB_EXPIRED, INVALID_PARAMETER
        ),
    },
)
async def job_events(
    job_id: str,
    request: Request,
    redis: RedisDep,
    caller: CallerDep,
    last_event_id: Annotated[
        str | None, Header(description="resume after this event (the `id` of the last event received)")
    ] = None,
) -> StreamingResponse:
    """A job's live progress, previews and end, as a Server-Sent Events stream."""
    if last_event_id is not None and not STREAM_ID.match(last_event_id):
        raise InvalidRequest(
            f"Last-Event-ID {last_event_id!r} is not an id this stream sent (they look like 1700000000000-0)",
            "invalid_request",
        )
    first = await run_in_threadpool(job_body, redis, job_id, caller)  # 404 / 410 before the stream
    stream = _events(request, redis, job_id, caller, first, last_event_id or START)
    return StreamingResponse(
        stream, media_type=EVENT_STREAM, headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
    )


async def _events(
    request: Request, redis: Redis, job_id: str, caller: Caller, body: JobBody, cursor: str
) -> AsyncIterator[str]:
    waits = request.app.state.waits
    queued: tuple[int | None, float | None] | None = None  # the last queued snapshot sent
    sent_at = time.monotonic()
    block_ms: int | None = None  # the first read does not wait
    started_at: float | None = None  # from the stream's started event (the body may predate it)
    while True:
        # Read the worker's events after the job's state: every event of a job that has ended was
        # written before it ended, so none is missed before the final event.
        reply = await waits.xread({events_key(job_id): cursor}, block=block_ms)
        block_ms = BLOCK_MS
        for entry_id, fields in reply[0][1] if reply else []:
            cursor = entry_id.decode()
            kind, data = fields[b"type"].decode(), fields[b"data"].decode()
            if kind == EventType.STARTED:
                started_at = StartedEvent.model_validate_json(data).started_at
            elif kind == EventType.PROGRESS:
                data = _with_eta(data, started_at or body.started_at, cursor)
            yield sse(kind, data, cursor)
            sent_at = time.monotonic()
        if body.status in ENDED_STATUSES:
            yield sse(body.status, body.model_dump_json(), cursor)
            return
        if body.status == JobStatus.QUEUED and (body.queue_position, body.eta_s) != queued:
            queued = (body.queue_position, body.eta_s)
            snapshot = QueuedEvent(id=job_id, queue_position=body.queue_position, eta_s=body.eta_s)
            yield sse(EventType.QUEUED, snapshot.model_dump_json(), cursor)
            sent_at = time.monotonic()
        if time.monotonic() - sent_at > KEEP_ALIVE_S:
            yield ": keep-alive\n\n"
            sent_at = time.monotonic()
        if await request.is_disconnected():
            return
        try:
            body = await run_in_threadpool(job_body, redis, job_id, caller)
        except (NotFound, Gone):  # deleted while watched (DELETE /v1/videos/{id}, or retention)
            return


def _with_eta(data: str, started_at: float | None, entry_id: str) -> str:
    """A worker's progress event with the ETA filled in from the job's pace when it was written (the
    entry id's first part is Redis' clock then, in ms), so a replayed event reads as it did live."""
    event = ProgressEvent.model_validate_json(data)
    written_at = int(entry_id.split("-")[0]) / 1000
    eta_s = running_eta_s(started_at, event.step, event.steps, written_at)
    return event.model_copy(update={"eta_s": eta_s}).model_dump_json()
