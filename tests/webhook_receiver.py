"""A webhook receiver for tests: a real HTTP server on 127.0.0.1 that records what it is sent.

Its answers are scripted per request (`answer(n)` for the n-th request, from 1): a status, a delay
before answering, extra headers, a body. Nothing but 127.0.0.1 is ever listened on.
"""

import contextlib
import json
import ssl
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


@dataclass(frozen=True)
class Answer:
    status: int = 200
    delay_s: float = 0.0
    headers: dict[str, str] = field(default_factory=dict)
    body: bytes = b"ok"


@dataclass(frozen=True)
class Received:
    """One request the receiver got, and what it answered."""

    path: str
    headers: dict[str, str]  # names lower-cased
    body: bytes
    at: float
    status: int

    @property
    def payload(self) -> dict:
        return json.loads(self.body)


class Receiver:
    """Records every request; answers the n-th as `answer(n)` says."""

    def __init__(
        self, answer: Callable[[int], Answer] = lambda _n: Answer(), tls: ssl.SSLContext | None = None
    ):
        self.answer = answer
        self.received: list[Received] = []
        self.lock = threading.Lock()
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802 - the name http.server calls
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                with receiver.lock:
                    number = len(receiver.received) + 1
                    scripted = receiver.answer(number)
                    headers = {name.lower(): value for name, value in self.headers.items()}
                    receiver.received.append(Received(self.path, headers, body, time.time(), scripted.status))
                time.sleep(scripted.delay_s)
                self.send_response(scripted.status)
                for name, value in scripted.headers.items():
                    self.send_header(name, value)
                self.send_header("Content-Length", str(len(scripted.body)))
                self.end_headers()
                with contextlib.suppress(OSError):  # the sender stops reading after 1 KiB
                    self.wfile.write(scripted.body)

            do_GET = do_POST  # noqa: N815 - a redirect followed by mistake would arrive as a GET

            def log_message(self, *_args: object) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        if tls is not None:
            self.server.socket = tls.wrap_socket(self.server.socket, server_side=True)

    @property
    def port(self) -> int:
        return self.server.server_address[1]

    def url(self, path: str = "/hook", scheme: str = "http", host: str = "127.0.0.1") -> str:
        return f"{scheme}://{host}:{self.port}{path}"

    def requests(self) -> list[Received]:
        with self.lock:
            return list(self.received)

    def wait_for(
        self, predicate: Callable[[list[Received]], bool], timeout_s: float, what: str
    ) -> list[Received]:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if predicate(got := self.requests()):
                return got
            time.sleep(0.05)
        raise AssertionError(f"timed out after {timeout_s} s waiting for {what}; received {self.requests()}")


@contextmanager
def receiving(
    answer: Callable[[int], Answer] = lambda _n: Answer(), tls: ssl.SSLContext | None = None
) -> Iterator[Receiver]:
    """A receiver serving on 127.0.0.1 for the block."""
    receiver = Receiver(answer, tls)
    thread = threading.Thread(
        target=receiver.server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True
    )
    thread.start()
    try:
        yield receiver
    finally:
        receiver.server.shutdown()
        receiver.server.server_close()
