"""GET /v1/jobs/{id}/events: a job's live progress as Server-Sent Events (dit_serve/events.py).

The stream (app/job_stream.py) replays the job's worker events after the client's `Last-Event-ID`
(all of them without one), adds `queued` snapshots while the job waits, and ends with one final event
carrying the job object.
"""

import re
from typing import Annotated

from fastapi import APIRouter, Header, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import StreamingResponse

from app.auth import CallerDep
from app.deps import RedisDep
from app.errors import InvalidRequest
from app.job_stream import KEEP_ALIVE, START, job_stream, sse
from app.openapi import (
    INVALID_PARAMETER,
    JOB_EXPIRED,
    JOB_NOT_FOUND,
    JOB_SCHEMA_TOO_NEW,
    REDIS_UNAVAILABLE,
    UNAUTHORIZED,
    error_responses,
    sse_schema,
)
from app.views import job_body
from dit_serve.events import EventType

router = APIRouter(prefix="/v1/jobs", tags=["jobs"])

STREAM_ID = re.compile(r"^\d{1,20}-\d{1,20}$")  # a Redis stream entry id, as our events' ids are
EVENT_STREAM = "text/event-stream"


@router.get(
    "/{job_id}/events",
    response_class=StreamingResponse,
    responses={
        200: {
            "description": "Server-Sent Events: `queued`, `started`, `progress`, `preview`, then one of "
            "`completed`, `failed` or `canceled` with the job object, after which the stream ends",
            "content": {EVENT_STREAM: {"schema": sse_schema([event.value for event in EventType])}},
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
    events = job_stream(request, redis, job_id, caller, first, last_event_id or START)
    return StreamingResponse(
        (KEEP_ALIVE if item is None else sse(*item) async for item in events),
        media_type=EVENT_STREAM,
        headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
    )
