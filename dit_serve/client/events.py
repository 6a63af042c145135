"""A job's live events as typed objects, and the state that carries one stream across reconnects.

The API's `GET /v1/jobs/{id}/events` (contract: dit_serve/events.py) sends `queued`, `started`,
`progress` and `preview` events, then one final `completed`, `failed` or `canceled` carrying the job
object, and ends. A connection that drops before the final event is reopened with `Last-Event-ID`, so
nothing is missed or repeated (but `queued`, a snapshot the API sends afresh). No I/O here: the sync
and async clients read the lines and feed them to `EventStream`.
"""

import httpx
from pydantic import BaseModel, ConfigDict

from dit_serve.client.calls import Calls, job_path
from dit_serve.client.errors import APIError, DitServeError
from dit_serve.client.retries import CallKind, retryable
from dit_serve.client.sse import ServerSentEvent, SSEDecoder
from dit_serve.events import (
    EVENT_TYPES,
    FINAL_EVENTS,
    EventType,
    PreviewEvent,
    ProgressEvent,
    QueuedEvent,
    StartedEvent,
)
from dit_serve.schemas import JobBody

EVENT_STREAM = "text/event-stream"
MS_PER_S = 1000
# A stream silent for this long is taken as dropped and reopened: the API sends keep-alive comments
# far more often than this while a job waits or runs.
STREAM_READ_TIMEOUT_S = 60.0


class JobEnded(BaseModel):
    """The final event: the job as it ended (`type` is completed, failed or canceled)."""

    model_config = ConfigDict(frozen=True)

    type: EventType
    job: JobBody


JobEvent = QueuedEvent | StartedEvent | ProgressEvent | PreviewEvent | JobEnded
PAYLOAD_MODELS: dict[EventType, type[QueuedEvent | StartedEvent | ProgressEvent | PreviewEvent]] = {
    EventType.QUEUED: QueuedEvent,
    **{kind: model for model, kind in EVENT_TYPES.items()},  # type: ignore[misc]
}


def parse_event(sse: ServerSentEvent) -> JobEvent | None:
    """The typed event; None for an event name this client does not know (a newer API's)."""
    try:
        kind = EventType(sse.event)
    except ValueError:
        return None
    if kind in FINAL_EVENTS:
        return JobEnded(type=kind, job=JobBody.model_validate_json(sse.data))
    return PAYLOAD_MODELS[kind].model_validate_json(sse.data)


class StreamDroppedError(DitServeError):
    """The event stream kept ending before the job did."""


class EventStream:
    """One job's event stream, across however many connections it takes to reach the final event."""

    def __init__(self, calls: Calls, job_id: str):
        self._calls = calls
        self.job_id = job_id
        self.ended = False
        self._decoder = SSEDecoder()
        self._failures = 0  # reconnects in a row without an event in between

    def request(self) -> httpx.Request:
        """The next connection's request: from the last event seen on, when there was one."""
        headers = {"Accept": EVENT_STREAM, "Cache-Control": "no-cache"}
        if self._decoder.last_event_id is not None:
            headers["Last-Event-ID"] = self._decoder.last_event_id
        return self._calls.request(
            "GET", f"{job_path(self.job_id)}/events", headers=headers, read_timeout_s=STREAM_READ_TIMEOUT_S
        )

    def opened(self, response: httpx.Response) -> None:
        """Check a connection's answer (its body read when it is an error); APIError unless 2xx."""
        if not response.is_success:
            raise APIError.from_response(response)
        # A half-received event of a dropped connection is discarded; the last id is kept.
        self._decoder = SSEDecoder(self._decoder.last_event_id)

    def feed(self, line: str) -> JobEvent | None:
        """One line of the stream; returns the event it completes, if any."""
        sse = self._decoder.feed(line)
        event = parse_event(sse) if sse is not None else None
        if event is not None:
            self._failures = 0
            self.ended = isinstance(event, JobEnded)
        return event

    def dropped(self, failure: APIError | httpx.TransportError | None) -> float:
        """The wait before reconnecting after a connection ended early (`failure`: why; None when the
        server closed it cleanly); raises the failure when another try is pointless or none are left."""
        if failure is not None and not retryable(CallKind.READ, failure):
            raise failure
        self._failures += 1
        retry_ms = self._decoder.retry_ms
        server_delay_s = failure.retry_after_s if isinstance(failure, APIError) else None
        if server_delay_s is None and retry_ms is not None:
            server_delay_s = retry_ms / MS_PER_S
        delay_s = self._calls.settings.retries.delay_s(self._failures, server_delay_s)
        if delay_s is None:
            raise failure or StreamDroppedError(
                f"the event stream of job {self.job_id} ended {self._failures} times in a row before the "
                "job did; follow it with wait() instead"
            )
        return delay_s
