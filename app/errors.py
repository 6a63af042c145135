"""Named API errors, each with one HTTP status and one error code; the handlers render them all alike."""

import logging
from collections.abc import Callable

from fastapi import FastAPI, Request, Response
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from redis.exceptions import RedisError
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.routing import Match, Mount
from starlette.types import ASGIApp, Message, Receive, Scope, Send

log = logging.getLogger(__name__)

BODY_TOO_LARGE = "body_too_large"
REQUEST_ID_STATE = "request_id"  # where app.middleware.RequestID keeps a request's id (scope["state"])
ERROR_RENDERER_STATE = "error_renderer"  # where a route keeps its own ErrorRenderer (scope["state"])
# FastAPI answers 400 when it cannot even decode a body as JSON (bytes that are not UTF-8, nesting too
# deep for the parser), where a body that decodes but does not parse gets its 422 json_invalid. All our
# bodies are JSON, so both are the documented 422 invalid_json; no route of ours raises a 400 itself.
UNDECODABLE_BODY_STATUS = 400
UNDECODABLE_BODY_MESSAGE = "the body could not be read as JSON: send UTF-8 JSON of reasonable depth"
HTTP_METHODS = ("DELETE", "GET", "HEAD", "OPTIONS", "PATCH", "POST", "PUT")
INTERNAL_ERROR_MESSAGE = (
    "an unexpected error occurred; it was logged with this request_id. Retry, and if it keeps "
    "happening report the request_id to the operator"
)


class APIError(Exception):
    """An error answered as {"error": {"code", "message"}} with `status`."""

    status = 500
    code = "internal_error"
    headers: dict[str, str] = {}

    def __init__(self, message: str, code: str | None = None, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.message = message
        self.headers = {**type(self).headers, **(headers or {})}  # a class's own headers, and these
        if code:
            self.code = code


class InvalidRequest(APIError):
    status, code = 422, "invalid_request"


class Unauthorized(APIError):
    status, code = 401, "unauthorized"
    headers = {"WWW-Authenticate": "Bearer"}  # RFC 6750: the scheme the client should use


class Forbidden(APIError):
    status, code = 403, "forbidden"


class UnsupportedMediaType(APIError):
    status, code = 415, "unsupported_media_type"


class NotFound(APIError):
    status, code = 404, "not_found"


class Conflict(APIError):
    status, code = 409, "conflict"


class Gone(APIError):
    status, code = 410, "gone"


class ServiceUnavailable(APIError):
    status, code = 503, "unavailable"


class TooManyRequests(APIError):
    """A limit was hit; `Retry-After` says when to try again."""

    status, code = 429, "too_many_requests"

    def __init__(self, message: str, code: str, retry_after_s: int):
        super().__init__(message, code, {"Retry-After": str(retry_after_s)})


def error_body(code: str, message: str, request_id: str | None = None) -> dict[str, dict[str, str]]:
    error = {"code": code, "message": message}
    if request_id:
        error["request_id"] = request_id
    return {"error": error}


def request_id_of(request: Request) -> str | None:
    """The id app.middleware.RequestID gave this request (None outside it)."""
    return request.scope.get("state", {}).get(REQUEST_ID_STATE)


# (request, status, code, message, headers) -> the answer: how a route family shapes its errors.
ErrorRenderer = Callable[[Request, int, str, str, dict[str, str] | None], Response]


def render_error(
    request: Request, status: int, code: str, message: str, headers: dict[str, str] | None
) -> JSONResponse:
    """Our error shape; a 5xx also names the request id its log lines carry."""
    body = error_body(code, message, request_id_of(request) if status >= 500 else None)
    return JSONResponse(body, status_code=status, headers=headers)


def error_response(
    request: Request, status: int, code: str, message: str, headers: dict[str, str] | None = None
) -> Response:
    """The error answer, in the shape of the request's route: ours, unless the route put another
    renderer in the scope's state (the OpenAI-compatible routes, app/openai_errors.py)."""
    request_id = request_id_of(request)
    # The header too: the last-resort handler answers outside the RequestID middleware.
    headers = {**(headers or {}), **({"X-Request-ID": request_id} if request_id else {})}
    render: ErrorRenderer = request.scope.get("state", {}).get(ERROR_RENDERER_STATE, render_error)
    return render(request, status, code, message, headers or None)


def allowed_methods(request: Request) -> str:
    """The `Allow` of a 405 (RFC 9110): every method some route of this path takes.

    Starlette's own names only the first route that matches the path, so `DELETE /v1/jobs/{id}`
    would be left out of a 405 for `PUT /v1/jobs/{id}`. Mounts (the docs' static files) are left out:
    they match every method.
    """
    routes = [route for route in request.app.router.routes if not isinstance(route, Mount)]
    return ", ".join(
        method
        for method in HTTP_METHODS
        if any(route.matches({**request.scope, "method": method})[0] is Match.FULL for route in routes)
    )


def _describe(errors: list[dict]) -> str:
    parts = []
    for error in errors:
        where = ".".join(str(part) for part in error.get("loc", ()) if part != "body")
        parts.append(f"{where}: {error.get('msg')}" if where else str(error.get("msg")))
    return "; ".join(parts)


# on_error(request, status, code): told of every error answer (the API counts refused submissions)
ErrorHook = Callable[[Request, int, str], None]


class UnexpectedErrors:
    """Answer an exception that escaped the app with `answer`'s error, when no answer has started.

    Plain ASGI rather than `@app.middleware("http")`, which costs a task group and a streamed copy of
    every answer.
    """

    def __init__(self, app: ASGIApp, answer: Callable[[Request, Exception], Response]):
        self.app = app
        self.answer = answer

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = False

        async def send_tracked(message: Message) -> None:
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, receive, send_tracked)
        except Exception as exc:
            if started:
                raise  # half an answer is out: nothing better can be sent now
            await self.answer(Request(scope, receive), exc)(scope, receive, send)


def install_error_handlers(app: FastAPI, on_error: ErrorHook | None = None) -> None:
    """Every failure, including FastAPI's own and unexpected ones, gets the documented error shape.

    Install it before any middleware that should see error answers (the request metrics): Starlette
    runs middlewares added later outside those added earlier.
    """

    def answer(
        request: Request, status: int, code: str, message: str, headers: dict[str, str] | None = None
    ) -> Response:
        if on_error:
            on_error(request, status, code)
        return error_response(request, status, code, message, headers)

    @app.exception_handler(APIError)
    async def api_error(request: Request, exc: APIError) -> Response:
        return answer(request, exc.status, exc.code, exc.message, exc.headers)

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, exc: RequestValidationError) -> Response:
        errors = list(exc.errors())
        code = (
            "invalid_json"
            if any(error.get("type") == "json_invalid" for error in errors)
            else "invalid_request"
        )
        return answer(request, 422, code, _describe(errors))

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> Response:
        if exc.status_code == UNDECODABLE_BODY_STATUS:
            return answer(request, 422, "invalid_json", UNDECODABLE_BODY_MESSAGE)
        code = {404: "not_found", 405: "method_not_allowed", 413: BODY_TOO_LARGE}.get(
            exc.status_code, "http_error"
        )
        headers = dict(exc.headers or {})
        if exc.status_code == 405 and (allowed := allowed_methods(request)):
            headers["Allow"] = allowed
        return answer(request, exc.status_code, code, str(exc.detail), headers)

    @app.exception_handler(RedisError)
    async def redis_error(request: Request, exc: RedisError) -> Response:
        # The cause (with Redis' address) goes to the log under the request id, not to the client.
        log.warning("redis unavailable (request %s): %s", request_id_of(request), exc)
        message = "the job store (Redis) is unreachable; retry later"
        return answer(request, 503, "redis_unavailable", message)

    def internal_error(request: Request, exc: Exception) -> Response:
        # The exception goes to the log only: its text can name hosts, buckets, paths or keys.
        log.error(
            "unexpected error answering %s %s (request %s)",
            request.method,
            request.url.path,
            request_id_of(request),
            exc_info=exc,
        )
        return answer(request, 500, "internal_error", INTERNAL_ERROR_MESSAGE)

    # Unexpected exceptions are answered by a middleware, inside the app: Starlette's handler for
    # Exception (ServerErrorMiddleware) sends its answer and then re-raises, and the server then
    # drops the keep-alive connection under the client and middlewares outside never see a response.
    app.add_middleware(UnexpectedErrors, answer=internal_error)

    # Last resort, for a failure in a middleware added after this one.
    app.exception_handler(Exception)(internal_error)
