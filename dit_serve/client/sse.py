"""A Server-Sent Events decoder, fed one line at a time (the WHATWG HTML "event stream" rules).

It does no I/O: the sync and async clients feed it the lines httpx reads, and it hands back each
complete event. Comment lines (`:` keep-alives) are skipped; `id` is remembered across events, as a
browser's EventSource does, so a reconnect can send it as `Last-Event-ID`.
"""

from dataclasses import dataclass

DEFAULT_EVENT = "message"


@dataclass(frozen=True)
class ServerSentEvent:
    """One dispatched event: its name, its data (lines joined by newlines) and the last id seen."""

    event: str
    data: str
    id: str | None


class SSEDecoder:
    """Turns the lines of an event stream into events; one decoder per connection."""

    def __init__(self, last_event_id: str | None = None):
        self.last_event_id = last_event_id  # survives events and reconnects, as the spec says
        self.retry_ms: int | None = None  # the server's reconnection delay, when it sent one
        self._event = ""
        self._data: list[str] = []

    def feed(self, line: str) -> ServerSentEvent | None:
        """Take one line (without its line ending); returns the event a blank line completes."""
        if not line:
            return self._dispatch()
        if line.startswith(":"):
            return None  # a comment: the server's keep-alive
        name, _, value = line.partition(":")
        value = value.removeprefix(" ")  # one space after the colon is part of the syntax
        if name == "event":
            self._event = value
        elif name == "data":
            self._data.append(value)
        elif name == "id" and "\0" not in value:
            self.last_event_id = value
        elif name == "retry" and value.isdigit():
            self.retry_ms = int(value)
        return None  # other field names are ignored

    def _dispatch(self) -> ServerSentEvent | None:
        event, data = self._event or DEFAULT_EVENT, self._data
        self._event, self._data = "", []
        if not data:
            return None  # an event without data is not dispatched
        return ServerSentEvent(event, "\n".join(data), self.last_event_id)
