"""Errors of the OpenAI-compatible routes in OpenAI's shape, so that the `openai` SDK raises its typed
exceptions (BadRequestError, AuthenticationError, NotFoundError, RateLimitError, ...).

The routes are declared with `OpenAIRoute` (or `OpenAIMultipartRoute`), which puts `render_openai_error`
in the request scope's state; app/errors.py's handlers then answer every error of the request, its
401s, validation errors and unexpected faults included, through it: `{"error": {"message", "type",
"param", "code"}}`. The codes stay ours (`unsupported_size`, `job_not_found`, ...); statuses move to
OpenAI's: a 422 (bad input) is a 400, a 415 (not multipart/JSON) a 400, a 410 (an expired job) a 404.
Errors answered before routing (an unknown path, a 405, a Content-Length over the body limit) keep
our own shape.
"""

from collections.abc import Callable, Coroutine
from typing import Any

from fastapi import Request, Response
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from fastapi.routing import APIRoute
from starlette.routing import Match
from starlette.types import Scope

from app.errors import ERROR_RENDERER_STATE, APIError

PARAM_STATE = "openai_error_param"  # the request field a validation error is about (scope["state"])
# Our statuses that OpenAI spells otherwise.
OPENAI_STATUS = {422: 400, 415: 400, 410: 404}
ERROR_TYPES = {401: "authentication_error", 403: "permission_error", 429: "rate_limit_error"}
CLIENT_ERROR_TYPE, SERVER_ERROR_TYPE = "invalid_request_error", "server_error"
# The request field each of our error codes is about, for OpenAI's `param`.
PARAM_OF_CODE = {
    "unsupported_size": "size",
    "unknown_label": "prompt",
    "no_label_names": "prompt",
    "unknown_model": "model",
    "wrong_kind": "model",
    "invalid_cursor": "after",
    "webhook_url_forbidden": "webhook_url",
    "no_webhook_secret": "webhook_url",
    "unknown_lora": "loras",
}
# The SDK retries 408, 409, 429 and 5xx unless told not to; a retried submission would queue a second
# job, so errors that follow an accepted job carry this header (openai-python's `x-should-retry`).
NO_RETRY = {"x-should-retry": "false"}
MULTIPART = "multipart/form-data"


class OpenAIError(APIError):
    """An error only the OpenAI-compatible routes answer, with the request field it is about."""

    def __init__(
        self,
        status: int,
        code: str,
        message: str,
        param: str | None = None,
        headers: dict[str, str] | None = None,
    ):
        super().__init__(message, code, headers)
        self.status = status
        self.param = param


def error_type(status: int) -> str:
    return ERROR_TYPES.get(status, SERVER_ERROR_TYPE if status >= 500 else CLIENT_ERROR_TYPE)


def openai_error_body(status: int, code: str, message: str, param: str | None) -> dict[str, Any]:
    return {"error": {"message": message, "type": error_type(status), "param": param, "code": code}}


def render_openai_error(
    request: Request, status: int, code: str, message: str, headers: dict[str, str] | None
) -> Response:
    """app/errors.py's ErrorRenderer for the OpenAI-compatible routes."""
    status = OPENAI_STATUS.get(status, status)
    param = request.scope.get("state", {}).get(PARAM_STATE) or PARAM_OF_CODE.get(code)
    return JSONResponse(openai_error_body(status, code, message, param), status_code=status, headers=headers)


def _field(loc: tuple[Any, ...]) -> str | None:
    """The field a validation error's location names: ("body", "n") -> "n"; ("query", "limit") -> "limit"."""
    parts = [str(part) for part in loc[1:]] if loc and loc[0] in ("body", "query", "path") else []
    return ".".join(parts) or None


class OpenAIRoute(APIRoute):
    """A route whose errors come in OpenAI's shape (render_openai_error)."""

    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        handle = super().get_route_handler()

        async def handle_in_openai_shape(request: Request) -> Response:
            state = request.scope.setdefault("state", {})
            state[ERROR_RENDERER_STATE] = render_openai_error
            try:
                return await handle(request)
            except RequestValidationError as exc:
                errors = list(exc.errors())
                state[PARAM_STATE] = _field(tuple(errors[0].get("loc", ()))) if errors else None
                raise
            except OpenAIError as exc:
                state[PARAM_STATE] = exc.param
                raise

        return handle_in_openai_shape


def is_multipart(scope: Scope) -> bool:
    for name, value in scope.get("headers", ()):
        if name == b"content-type":
            return value.decode("latin-1").split(";")[0].strip().lower() == MULTIPART
    return False


class OpenAIMultipartRoute(OpenAIRoute):
    """A route that takes only multipart/form-data requests, beside a JSON route of the same path and
    method: `POST /v1/videos` is OpenAI's video API when multipart (what the SDK sends), and our job
    API otherwise. Registered before the JSON route, it lets every other request fall through to it."""

    def matches(self, scope: Scope) -> tuple[Match, Scope]:
        match, child_scope = super().matches(scope)
        if match is Match.FULL and not is_multipart(scope):
            return Match.NONE, {}
        return match, child_scope
