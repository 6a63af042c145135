"""Read a Server-Sent Events stream over real HTTP, for the events tests."""

import json
from collections.abc import Iterator
from dataclasses import dataclass

import httpx


@dataclass(frozen=True)
class Event:
    name: str
    data: dict
    id: str | None


def read_events(client: httpx.Client, path: str, headers: dict[str, str] | None = None) -> Iterator[Event]:
    """Each event of the stream at `path`, until the server ends it (comments are skipped)."""
    with client.stream("GET", path, headers=headers, timeout=120) as response:
        assert response.status_code == 200, response.read()
        assert response.headers["content-type"].startswith("text/event-stream")
        fields: dict[str, str] = {}
        for line in response.iter_lines():
            if line.startswith(":"):
                continue
            if line:
                name, _, value = line.partition(": ")
                fields[name] = value
                continue
            if "event" in fields:
                yield Event(fields["event"], json.loads(fields["data"]), fields.get("id"))
            fields = {}
