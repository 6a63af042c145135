"""Pure ASGI middlewares: a request id on every answer, and a limit on the request body's size.

Both are plain ASGI (not `@app.middleware("http")`), so they wrap `receive` and `send` without
buffering anything: the body limit counts bytes as they stream in and stops at the limit.
"""

import re
import uuid

from starlette.datastructures import Headers, MutableHeaders
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from app.errors import BODY_TOO_LARGE, REQUEST_ID_STATE, ErrorHook, error_response

REQUEST_ID_HEADER = "X-Request-ID"
# A client's id is kept when it is 1-128 visible ASCII characters from this set (no spaces, no
# control characters, nothing a log or header parser could take for syntax); otherwise a fresh one.
REQUEST_ID_PATTERN = re.compile(r"[A-Za-z0-9._~:+/=@-]{1,128}")


class RequestID:
    """Every answer carries X-Request-ID: the client's when well-formed, else a fresh one."""

    def __init__(self, app: ASGIApp):
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        sent = Headers(scope=scope).get(REQUEST_ID_HEADER)
        request_id = sent if sent and REQUEST_ID_PATTERN.fullmatch(sent) else uuid.uuid4().hex
        scope.setdefault("state", {})[REQUEST_ID_STATE] = request_id

        async def send_with_id(message: Message) -> None:
            if message["type"] == "http.response.start":
                MutableHeaders(scope=message)[REQUEST_ID_HEADER] = request_id
            await send(message)

        await self.app(scope, receive, send_with_id)


class BodyTooLarge(HTTPException):
    """Raised from `receive` when a streamed body passes the limit.

    An HTTPException, because FastAPI turns any other exception raised while it reads a body into a
    400; this one reaches the error handlers (app/errors.py), which answer 413 `body_too_large`.
    """

    def __init__(self, limit: int):
        super().__init__(413, body_too_large_message(limit))


def body_too_large_message(limit: int) -> str:
    return f"the request body is larger than {limit} bytes (DIT_MAX_BODY_BYTES); send a smaller one"


class BodyLimit:
    """Refuse a request body over `max_bytes` with 413 `body_too_large`, without reading it all.

    A Content-Length over the limit is answered at once, before the app runs; a body without one
    (chunked) is counted as it streams, and reading stops at the first chunk past the limit.
    """

    def __init__(self, app: ASGIApp, max_bytes: int, on_error: ErrorHook | None = None):
        self.app = app
        self.max_bytes = max_bytes
        self.on_error = on_error

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        length = Headers(scope=scope).get("content-length")
        if length is not None and length.isdigit() and int(length) > self.max_bytes:
            request = Request(scope)
            if self.on_error:
                self.on_error(request, 413, BODY_TOO_LARGE)
            response = error_response(request, 413, BODY_TOO_LARGE, body_too_large_message(self.max_bytes))
            await response(scope, receive, send)
            return
        received = 0

        async def receive_counted() -> Message:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_bytes:
                    raise BodyTooLarge(self.max_bytes)
            return message

        await self.app(scope, receive_counted, send)
