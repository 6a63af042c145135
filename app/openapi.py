"""What /openapi.json says beyond what FastAPI infers: each route's errors, and the headers it reads.

A route passes `responses=error_responses(...)` the errors it can answer; every error has the shape
`ErrorBody` (app/errors.py renders them all). FastAPI adds its own 422 (`HTTPValidationError`, a
shape we never send) to routes with parameters that do not declare one; `install_openapi` drops it,
so a route whose parameters cannot fail (a string path parameter) documents no 422 at all.
"""

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi
from pydantic import BaseModel

from app.middleware import REQUEST_ID_HEADER
from app.openai_errors import NO_RETRY, OPENAI_STATUS, OpenAIMultipartRoute
from app.openai_schemas import OpenAIErrorBody
from dit_serve.idempotency import IDEMPOTENCY_HEADER, VALID_KEY
from dit_serve.schemas import ErrorBody

ERROR_STATUS = 400  # statuses from here on are errors, answered as ErrorBody
FASTAPI_VALIDATION_SCHEMAS = ("HTTPValidationError", "ValidationError")
REQUEST_ID_DOC = {
    "description": "the client's own id when it sent a well-formed one, else a fresh one; 5xx bodies "
    "repeat it as `request_id`",
    "required": True,
    "schema": {"type": "string"},
}


@dataclass(frozen=True)
class DocumentedError:
    """A status a route can answer, the error codes it carries there, and when."""

    status: int
    codes: tuple[str, ...]
    when: str
    headers: Mapping[str, dict[str, Any]] = field(default_factory=dict)


UNAUTHORIZED = DocumentedError(
    401,
    ("unauthorized",),
    "auth is on and the request has no valid API key (missing, malformed, unknown or revoked)",
    {"WWW-Authenticate": {"description": "`Bearer` (RFC 6750)", "schema": {"type": "string"}}},
)
JOB_NOT_FOUND = DocumentedError(
    404, ("job_not_found",), "no such job: never created, expired, or created by another API key"
)
OUTPUT_NOT_FOUND = DocumentedError(
    404, ("output_not_found",), "the job has no output of that index, or it is gone from storage"
)
JOB_EXPIRED = DocumentedError(
    410,
    ("job_expired",),
    "the job ended more than `DIT_JOB_TTL_S` ago, so its record and outputs were deleted; answered "
    "for `DIT_EXPIRED_GRACE_S` after that, then 404 `job_not_found`",
)
JOB_FINISHED = DocumentedError(
    409, ("job_finished",), "the job has already completed, failed or been canceled"
)
IDEMPOTENCY_CONFLICT = DocumentedError(
    409,
    ("idempotency_key_reused", "idempotency_key_in_use"),
    "the `Idempotency-Key` came with a different request within 24 h, or its first request is still "
    "being accepted (retry)",
)
BODY_TOO_LARGE = DocumentedError(
    413, ("body_too_large",), "the body is over `DIT_MAX_BODY_BYTES`; refused before it is read"
)
UNSUPPORTED_MEDIA_TYPE = DocumentedError(
    415, ("unsupported_media_type",), "the body is not sent with `Content-Type: application/json`"
)
INVALID_PARAMETER = DocumentedError(
    422, ("invalid_request",), "a path or query parameter of the wrong type or out of its range"
)
INVALID_CURSOR = DocumentedError(
    422, ("invalid_cursor",), "`after` names no job of this listing (it may have expired)"
)
INVALID_SUBMISSION = DocumentedError(
    422,
    (
        "invalid_request",
        "invalid_json",
        "unknown_model",
        "wrong_kind",
        "unknown_label",
        "no_label_names",
        "unsupported_size",
        "invalid_idempotency_key",
        "webhook_url_forbidden",
        "no_webhook_secret",
        "unsupported_cache",
        "unknown_lora",
    ),
    "bad input, checked against the schema and then against the model (GET /v1/models); a webhook_url "
    "the service may not send to (`webhook_url_forbidden`: not https, or an address that is not public), "
    "or one that cannot be signed (`no_webhook_secret`); nothing is queued",
)
LIMITED = DocumentedError(
    429,
    ("rate_limited", "quota_exceeded", "queue_full"),
    "the API key's jobs per minute, or its jobs queued or running at once, or the model's queue "
    "(`--max-queue-depth`) is at its limit; nothing is queued",
    {
        "Retry-After": {
            "description": "seconds after which a retry should be accepted",
            "required": True,
            "schema": {"type": "integer", "minimum": 1},
        }
    },
)
ADMIN_ONLY = DocumentedError(403, ("admin_only",), "the route needs an admin API key")
INVALID_LORA = DocumentedError(
    422,
    ("invalid_request", "invalid_json", "unknown_model", "invalid_lora", "lora_does_not_fit"),
    "the body, the model, or the adapter at `source`: not readable by the server, not a LoRA this "
    "server runs (`invalid_lora`), or trained for another base model (`lora_does_not_fit`)",
)
LORA_EXISTS = DocumentedError(
    409, ("lora_exists",), "the model has an adapter of that name with other weights; delete it first"
)
LORA_NOT_FOUND = DocumentedError(404, ("lora_not_found",), "the model has no adapter of that name")
NO_LAYERS = DocumentedError(
    503, ("no_worker",), "no worker of the model has started since Redis was emptied: its layers are unknown"
)
REDIS_UNAVAILABLE = DocumentedError(
    503, ("redis_unavailable",), "the job store (Redis) is unreachable; retry later"
)
NO_MODEL = DocumentedError(503, ("no_model",), "no live worker serves a model of this kind")
NO_WORKER = DocumentedError(503, ("no_worker",), "no live worker")
JOB_SCHEMA_TOO_NEW = DocumentedError(
    503, ("job_schema_too_new",), "a newer API wrote the job (mid rolling upgrade); retry later"
)
INTERNAL_ERROR = DocumentedError(
    500, ("internal_error",), "an unexpected fault, logged under the body's `request_id`"
)


def error_responses(
    *errors: DocumentedError, body: type[BaseModel] = ErrorBody, statuses: Mapping[int, int] | None = None
) -> dict[int | str, dict[str, Any]]:
    """A route's `responses=` for `errors`, and 500 `internal_error`, which any route can answer.

    Args:
        errors: what the route can answer; several with one status are described together.
        body: the shape of the route's errors (OpenAIErrorBody on the OpenAI-compatible routes).
        statuses: the status each of ours is answered with on the route, where it differs.

    Returns:
        status -> FastAPI's additional response: the `body` model, a description naming each
        code, and the headers of that answer.
    """
    by_status: dict[int, list[DocumentedError]] = {}
    for error in (*errors, INTERNAL_ERROR):
        by_status.setdefault((statuses or {}).get(error.status, error.status), []).append(error)
    return {status: _response(group, body) for status, group in sorted(by_status.items())}


def _response(errors: list[DocumentedError], body: type[BaseModel]) -> dict[str, Any]:
    lines = [f"- {', '.join(f'`{code}`' for code in error.codes)}: {error.when}" for error in errors]
    headers = {name: doc for error in errors for name, doc in error.headers.items()}
    return {"model": body, "description": "\n".join(lines), **({"headers": headers} if headers else {})}


# POST /v1/images and /v1/videos read Idempotency-Key from the request itself, so it is declared here.
SUBMISSION_PARAMETERS: dict[str, Any] = {
    "parameters": [
        {
            "name": IDEMPOTENCY_HEADER,
            "in": "header",
            "required": False,
            "description": "the same key and body within 24 h return the same job: 1-255 visible ASCII "
            "characters, e.g. a UUID",
            "schema": {"type": "string", "pattern": VALID_KEY.pattern},
        }
    ]
}
SUBMISSION_RESPONSES: dict[int | str, dict[str, Any]] = {
    202: {
        "headers": {
            "Location": {"description": "the job's URL", "required": True, "schema": {"type": "string"}},
            "Idempotent-Replayed": {
                "description": "`true` when an earlier request with this Idempotency-Key created the job",
                "schema": {"type": "string", "enum": ["true"]},
            },
        }
    },
    **error_responses(
        UNAUTHORIZED,
        IDEMPOTENCY_CONFLICT,
        BODY_TOO_LARGE,
        UNSUPPORTED_MEDIA_TYPE,
        INVALID_SUBMISSION,
        LIMITED,
        REDIS_UNAVAILABLE,
        NO_MODEL,
        JOB_SCHEMA_TOO_NEW,
    ),
}


# The OpenAI-compatible routes (app/routes/openai_*.py): OpenAI's error shape and statuses.
NOT_RETRIED = {
    name: {
        "description": "`false`: the SDK must not retry (it would queue the job again)",
        "schema": {"type": "string"},
    }
    for name in NO_RETRY
}
VIDEO_NOT_FOUND = DocumentedError(
    404,
    ("job_not_found", "video_not_found", "output_not_found"),
    "no such video: never created, deleted, expired, created by another API key, or an image job",
)

VIDEO_RUNNING = DocumentedError(
    409, ("video_running",), "the video was asked to stop but still runs after 30 s; retry the DELETE"
)
UNSUPPORTED_SECONDS = DocumentedError(
    400, ("unsupported_seconds",), "`seconds` that the model's frames cannot last at a whole fps from 1 to 60"
)
VIDEO_NOT_READY = DocumentedError(
    409, ("video_not_ready",), "the video has not completed: it has no content yet", NOT_RETRIED
)
GENERATION_FAILED = DocumentedError(
    500,
    (
        "sampling_failed",
        "storage_failed",
        "invalid_job",
        "worker_lost",
        "timeout",
        "queue_timeout",
        "no_worker",
    ),
    "the image job failed (its error code and message, and the job id)",
    NOT_RETRIED,
)
GENERATION_CANCELED = DocumentedError(
    409,
    ("job_canceled",),
    "the image job was canceled (DELETE /v1/jobs/{id}) while the answer waited",
    NOT_RETRIED,
)
GENERATION_TIMEOUT = DocumentedError(
    504,
    ("generation_timeout",),
    "the image job did not end within `DIT_OPENAI_WAIT_S`; it goes on, and the message names it: poll "
    "`GET /v1/jobs/{id}`",
    {**NOT_RETRIED, "Location": {"description": "the job's URL", "schema": {"type": "string"}}},
)


def openai_error_responses(*errors: DocumentedError) -> dict[int | str, dict[str, Any]]:
    """`error_responses` in OpenAI's shape and statuses; a 413 is ours, answered before any route."""
    responses = error_responses(*errors, body=OpenAIErrorBody, statuses=OPENAI_STATUS)
    if 413 in responses:
        responses[413]["model"] = ErrorBody
    return responses


OPENAI_SUBMISSION_ERRORS = (
    UNAUTHORIZED,
    IDEMPOTENCY_CONFLICT,
    BODY_TOO_LARGE,
    INVALID_SUBMISSION,
    LIMITED,
    REDIS_UNAVAILABLE,
    NO_MODEL,
    JOB_SCHEMA_TOO_NEW,
)
OPENAI_IMAGES_RESPONSES = openai_error_responses(
    *OPENAI_SUBMISSION_ERRORS,
    UNSUPPORTED_MEDIA_TYPE,
    GENERATION_FAILED,
    GENERATION_CANCELED,
    GENERATION_TIMEOUT,
)


def sse_schema(events: list[str]) -> dict[str, object]:
    """The OpenAPI schema of one event of an SSE stream of these `events`, each carrying JSON."""
    return {
        "type": "object",
        "properties": {
            "event": {"type": "string", "enum": events},
            "data": {"type": "string", "contentMediaType": "application/json"},
            "id": {"type": "string"},
        },
        "required": ["event", "data"],
    }


OPENAI_IMAGES_RESPONSES[200] = {
    "description": "the images; with `stream: true`, Server-Sent Events (image_generation.partial_image, "
    "then image_generation.completed per image, or error)",
    "content": {
        "text/event-stream": {
            "schema": sse_schema(["image_generation.partial_image", "image_generation.completed", "error"])
        }
    },
}
OPENAI_SUBMISSION_RESPONSES = openai_error_responses(*OPENAI_SUBMISSION_ERRORS, UNSUPPORTED_SECONDS)
_OPENAI_READ_ERRORS = (UNAUTHORIZED, REDIS_UNAVAILABLE, JOB_SCHEMA_TOO_NEW, INVALID_PARAMETER)
OPENAI_LIST_RESPONSES = openai_error_responses(*_OPENAI_READ_ERRORS, INVALID_CURSOR)
OPENAI_READ_RESPONSES = openai_error_responses(*_OPENAI_READ_ERRORS, VIDEO_NOT_FOUND, JOB_EXPIRED)
OPENAI_CONTENT_RESPONSES = openai_error_responses(
    *_OPENAI_READ_ERRORS, VIDEO_NOT_FOUND, JOB_EXPIRED, VIDEO_NOT_READY
)
OPENAI_DELETE_RESPONSES = openai_error_responses(
    *_OPENAI_READ_ERRORS, VIDEO_NOT_FOUND, JOB_EXPIRED, VIDEO_RUNNING
)


def install_openapi(app: FastAPI) -> None:
    """Make `app.openapi()` drop FastAPI's default 422, give every error response the media type our
    handlers answer with (JSON, whatever the route's own), and name `X-Request-ID` on every answer."""
    build = app.openapi

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            schema = _mended(build())
            for route in app.routes:
                if isinstance(route, OpenAIMultipartRoute):
                    _merge_operation(
                        schema, _mended(get_openapi(title=app.title, version=app.version, routes=[route]))
                    )
            app.openapi_schema = schema
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]  # FastAPI's documented way to extend it


def _merge_operation(schema: dict[str, Any], alternate: dict[str, Any]) -> None:
    """Merge the one operation of `alternate` into `schema`'s operation of the same path and method.

    FastAPI keeps one operation per path and method, the last route's: here the JSON route of `POST
    /v1/videos`, which the multipart one (OpenAI's) precedes. The merged operation takes both bodies,
    answers both 2xx, and an error status both answer has either error shape (anyOf).
    """
    for component, models in alternate.get("components", {}).items():
        for name, model in models.items():
            schema.setdefault("components", {}).setdefault(component, {}).setdefault(name, model)
    for path, operations in alternate["paths"].items():
        for method, extra in operations.items():
            operation = schema["paths"][path][method]
            operation["requestBody"]["content"].update(extra["requestBody"]["content"])
            operation["description"] = f"{operation.get('description', '')}\n\n{extra.get('description', '')}"
            for status, answer in extra["responses"].items():
                merged = operation["responses"].setdefault(status, answer)
                if merged is answer:
                    continue
                merged["description"] = f"{merged['description']}\n{answer['description']}"
                merged.setdefault("headers", {}).update(answer.get("headers", {}))
                for media_type, content in answer.get("content", {}).items():
                    mine = merged.setdefault("content", {}).setdefault(media_type, content)
                    if mine is not content and mine["schema"] != content["schema"]:
                        mine["schema"] = {"anyOf": [mine["schema"], content["schema"]]}


def _mended(schema: dict[str, Any]) -> dict[str, Any]:
    default_422 = {"$ref": f"#/components/schemas/{FASTAPI_VALIDATION_SCHEMAS[0]}"}
    for operations in schema["paths"].values():
        for operation in operations.values():
            responses = operation["responses"]
            content = responses.get("422", {}).get("content", {}).get("application/json", {})
            if content.get("schema") == default_422:
                del responses["422"]
            for status, response in responses.items():
                response.setdefault("headers", {})[REQUEST_ID_HEADER] = REQUEST_ID_DOC
                if int(status) >= ERROR_STATUS and response.get("content"):
                    # Errors are JSON whatever the route answers (FastAPI gives them its media type).
                    response["content"] = {"application/json": next(iter(response["content"].values()))}
    for name in FASTAPI_VALIDATION_SCHEMAS:
        schema.get("components", {}).get("schemas", {}).pop(name, None)
    return schema
