"""A job's events as an async stream, for the SSE routes (GET /v1/jobs/{id}/events and OpenAI's
streamed image generation): the worker's events from the job's Redis stream (dit_serve/events.py),
`queued` snapshots from the job's state, keep-alive ticks, and the final event carrying the job.

Blocking reads go through the app's asyncio Redis client, so an open stream holds no thread. Each
wait for worker events also watches the job's `ended` list (pushed by whoever ends the job, as for
`?wait=`), so the final event follows the job's end at once rather than after the wait runs out.
"""

import asyncio
import time
from collections.abc import AsyncIterator
from typing import Any

from fastapi import Request
from fastapi.concurrency import run_in_threadpool
from redis import Redis

from app.auth import Caller
from app.errors import Gone, NotFound
from app.views import job_body
from dit_serve.eta import running_eta_s
from dit_serve.events import (
    EventType,
    ProgressEvent,
    QueuedEvent,
    StartedEvent,
    events_key,
    parse_entries,
)
from dit_serve.jobs import ENDED_STATUSES, JobStatus, ended_key
from dit_serve.schemas import JobBody

BLOCK_MS = 1000  # wait this long for worker events before looking at the job's state again
KEEP_ALIVE_S = 15.0  # a tick this often keeps proxies from closing a quiet stream
START = "0"  # before every entry
KEEP_ALIVE = ": keep-alive\n\n"  # an SSE comment


# (event name, JSON payload, stream id of the last worker event delivered), or None: a keep-alive tick.
StreamItem = tuple[str, str, str] | None


def sse(event: str, data: str, event_id: str = START) -> str:
    """One Server-Sent Event; `data` is one line of JSON, `event_id` (unless START) its `id`."""
    head = f"id: {event_id}\n" if event_id != START else ""
    return f"{head}event: {event}\ndata: {data}\n\n"


async def job_stream(
    request: Request, redis: Redis, job_id: str, caller: Caller, body: JobBody, cursor: str = START
) -> AsyncIterator[StreamItem]:
    """The events of job `job_id` after stream id `cursor`, ending with its final event (the event
    named after its final status, carrying `body` as the API answers it). `body` is the job as read
    just before; the stream also ends, with no final event, if the job is deleted meanwhile."""
    waits = request.app.state.waits
    queued: tuple[int | None, float | None] | None = None  # the last queued snapshot sent
    sent_at = time.monotonic()
    block_ms: int | None = None  # the first read does not wait
    started_at: float | None = None  # from the stream's started event (the body may predate it)
    while True:
        # Read the worker's events after the job's state: every event of a job that has ended was
        # written before it ended, so none is missed before the final event.
        reply = await _read_events(waits, job_id, cursor, block_ms)
        block_ms = BLOCK_MS
        for cursor, kind, data in parse_entries(reply):
            if kind == EventType.STARTED:
                started_at = StartedEvent.model_validate_json(data).started_at
            elif kind == EventType.PROGRESS:
                data = _with_eta(data, started_at or body.started_at, cursor)
            yield kind, data, cursor
            sent_at = time.monotonic()
        if body.status in ENDED_STATUSES:
            yield body.status, body.model_dump_json(), cursor
            return
        if body.status == JobStatus.QUEUED and (body.queue_position, body.eta_s) != queued:
            queued = (body.queue_position, body.eta_s)
            snapshot = QueuedEvent(id=job_id, queue_position=body.queue_position, eta_s=body.eta_s)
            yield EventType.QUEUED, snapshot.model_dump_json(), cursor
            sent_at = time.monotonic()
        if time.monotonic() - sent_at > KEEP_ALIVE_S:
            yield None
            sent_at = time.monotonic()
        if await request.is_disconnected():
            return
        try:
            body = await run_in_threadpool(job_body, redis, job_id, caller)
        except (NotFound, Gone):  # deleted while watched (DELETE /v1/videos/{id}, or retention)
            return


async def _read_events(waits: Any, job_id: str, cursor: str, block_ms: int | None) -> Any:
    """XREAD of the job's events after `cursor`, waiting up to `block_ms` for one, or until the job
    ends: then what was written before the end, without waiting."""
    key = events_key(job_id)
    if block_ms is None:
        return await waits.xread({key: cursor})
    ended = ended_key(job_id)
    read = asyncio.ensure_future(waits.xread({key: cursor}, block=block_ms))
    end = asyncio.ensure_future(waits.blmove(ended, ended, block_ms / 1000, "RIGHT", "LEFT"))
    try:
        done, _ = await asyncio.wait({read, end}, return_when=asyncio.FIRST_COMPLETED)
    finally:  # also when the stream itself is cancelled (its client went away)
        for task in (read, end):
            task.cancel()  # none on a finished task; redis-py drops a cancelled command's connection
    await asyncio.gather(read, end, return_exceptions=True)
    if read in done:
        return read.result()
    end.result()  # a Redis error here is the stream's, as the read's would be
    return await waits.xread({key: cursor})


def _with_eta(data: str, started_at: float | None, entry_id: str) -> str:
    """A worker's progress event with the ETA filled in from the job's pace when it was written (the
    entry id's first part is Redis' clock then, in ms), so a replayed event reads as it did live."""
    event = ProgressEvent.model_validate_json(data)
    written_at = int(entry_id.split("-")[0]) / 1000
    eta_s = running_eta_s(started_at, event.step, event.steps, written_at)
    return event.model_copy(update={"eta_s": eta_s}).model_dump_json()
