"""/openapi.json in-process: every operation's error statuses in our error shape, the bearer scheme where
a key is needed, and the answers the fuzz run (tests/test_openapi_fuzz.py) found undocumented."""

from typing import Any

import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient

from app.errors import install_error_handlers
from app.main import create_app
from dit_serve.config import Settings

ERROR_BODY = {"$ref": "#/components/schemas/ErrorBody"}
EVERY_ROUTE = {500}
NEEDS_A_KEY = {401, 503} | EVERY_ROUTE  # a key is checked in Redis
SUBMISSION = NEEDS_A_KEY | {409, 413, 415, 422, 429}
ERROR_STATUSES = {
    ("post", "/v1/images"): SUBMISSION,
    ("post", "/v1/videos"): SUBMISSION | {400},  # 400: OpenAI's multipart create (see below)
    ("get", "/v1/jobs"): NEEDS_A_KEY | {422},
    ("get", "/v1/jobs/{job_id}"): NEEDS_A_KEY | {404, 410, 422},
    ("delete", "/v1/jobs/{job_id}"): NEEDS_A_KEY | {404, 409, 410},
    ("get", "/v1/jobs/{job_id}/outputs/{index}"): NEEDS_A_KEY | {404, 410, 422},
    ("get", "/v1/jobs/{job_id}/events"): NEEDS_A_KEY | {404, 410, 422},
    ("get", "/v1/models"): NEEDS_A_KEY,
    ("get", "/v1/loras"): NEEDS_A_KEY,
    ("post", "/v1/loras"): NEEDS_A_KEY | {403, 409, 413, 415, 422},
    ("delete", "/v1/loras/{model}/{name}"): NEEDS_A_KEY | {403, 404},
    ("get", "/healthz"): EVERY_ROUTE,
    ("get", "/readyz"): EVERY_ROUTE | {503},
    ("get", "/metrics"): EVERY_ROUTE,
    # OpenAI-compatible: OpenAI's statuses (400 for bad input) and error shape (OPENAI_ERROR_BODY).
    ("post", "/v1/images/generations"): NEEDS_A_KEY | {400, 409, 413, 429, 504},
    ("get", "/v1/videos"): NEEDS_A_KEY | {400},
    ("get", "/v1/videos/{video_id}"): NEEDS_A_KEY | {400, 404},
    ("delete", "/v1/videos/{video_id}"): NEEDS_A_KEY | {400, 404, 409},
    ("get", "/v1/videos/{video_id}/content"): NEEDS_A_KEY | {400, 404, 409},
}
OPENAI_ERROR_BODY = {"$ref": "#/components/schemas/OpenAIErrorBody"}
# POST /v1/videos is ours (JSON) and OpenAI's (multipart/form-data): statuses both answer take either shape.
EITHER_ERROR_BODY = {"anyOf": [ERROR_BODY, OPENAI_ERROR_BODY]}
POST_VIDEOS_ERRORS = {400: OPENAI_ERROR_BODY, 413: ERROR_BODY, 415: ERROR_BODY, 422: ERROR_BODY}


def _error_body(key: tuple[str, str], status: int) -> dict[str, Any]:
    """The schema of an error answer: ours, OpenAI's on its routes (413: ours, answered before them)."""
    if key == ("post", "/v1/videos"):
        return POST_VIDEOS_ERRORS.get(status, EITHER_ERROR_BODY)
    openai_route = key[1].startswith("/v1/videos") or key[1] == "/v1/images/generations"
    return OPENAI_ERROR_BODY if openai_route and status != 413 else ERROR_BODY


@pytest.fixture(scope="module")
def schema() -> dict[str, Any]:
    return create_app(Settings(redis_url="redis://127.0.0.1:1/0")).openapi()


def _operations(schema: dict[str, Any]) -> dict[tuple[str, str], dict[str, Any]]:
    return {(method, path): op for path, ops in schema["paths"].items() for method, op in ops.items()}


def test_every_operation_lists_its_error_statuses_in_the_error_shape(schema: dict[str, Any]) -> None:
    operations = _operations(schema)
    assert set(operations) == set(ERROR_STATUSES)  # a new route is added here, with its errors
    for key, operation in operations.items():
        errors = {
            int(status): answer for status, answer in operation["responses"].items() if int(status) >= 400
        }
        assert set(errors) == ERROR_STATUSES[key], key
        for status, answer in errors.items():
            assert answer["content"] == {"application/json": {"schema": _error_body(key, status)}}, (
                key,
                status,
            )
            assert answer["description"].startswith("- `"), (key, status)  # the codes, each named
            assert "X-Request-ID" in answer["headers"], (key, status)
    detail = schema["components"]["schemas"]["ErrorDetail"]
    assert detail["required"] == ["code", "message"] and "request_id" in detail["properties"]
    assert "HTTPValidationError" not in str(schema)  # FastAPI's 422 shape, which we never send


def test_401_names_the_scheme_and_429_the_limits_and_retry_after(schema: dict[str, Any]) -> None:
    submission = schema["paths"]["/v1/images"]["post"]["responses"]
    assert "WWW-Authenticate" in submission["401"]["headers"]
    assert submission["429"]["headers"]["Retry-After"]["required"] is True
    for code in ("rate_limited", "quota_exceeded", "queue_full"):
        assert f"`{code}`" in submission["429"]["description"]
    for code in ("invalid_json", "unknown_model", "invalid_idempotency_key"):
        assert f"`{code}`" in submission["422"]["description"]
    idempotency = schema["paths"]["/v1/images"]["post"]["parameters"]
    assert [parameter["name"] for parameter in idempotency] == ["Idempotency-Key"]


def test_the_job_routes_say_when_an_expired_job_is_a_410(schema: dict[str, Any]) -> None:
    paths = schema["paths"]
    for operation in (
        paths["/v1/jobs/{job_id}"]["get"],
        paths["/v1/jobs/{job_id}"]["delete"],
        paths["/v1/jobs/{job_id}/outputs/{index}"]["get"],
    ):
        assert "`job_expired`" in operation["responses"]["410"]["description"]
        assert "DIT_EXPIRED_GRACE_S" in operation["responses"]["410"]["description"]


def test_routes_that_answer_401_need_the_bearer_key_and_health_stays_open(schema: dict[str, Any]) -> None:
    assert schema["components"]["securitySchemes"]["APIKey"]["scheme"] == "bearer"
    for key, operation in _operations(schema).items():
        expected = [{"APIKey": []}] if "401" in operation["responses"] else None
        assert operation.get("security") == expected, key
    assert "security" not in schema["paths"]["/healthz"]["get"]


def test_a_request_names_prompt_or_class_labels_in_the_schema_too(schema: dict[str, Any]) -> None:
    one_of = schema["components"]["schemas"]["ImageRequest"]["oneOf"]
    assert [branch["required"] for branch in one_of] == [["prompt"], ["class_labels"]]


def _two_methods_one_path() -> FastAPI:
    app = FastAPI()

    @app.get("/things/{name}")
    def read(name: str) -> dict[str, str]:
        return {"name": name}

    @app.delete("/things/{name}")
    def remove(name: str) -> dict[str, str]:
        return {"name": name}

    @app.post("/things")
    def create(body: dict[str, str]) -> dict[str, str]:
        return body

    install_error_handlers(app)
    return app


def test_a_405_allows_every_method_of_the_path_not_only_the_first_routes() -> None:
    client = TestClient(_two_methods_one_path())
    refused = client.put("/things/a")
    assert refused.status_code == 405 and refused.json()["error"]["code"] == "method_not_allowed"
    assert refused.headers["Allow"] == "DELETE, GET"
    assert client.request("TRACE", "/things").headers["Allow"] == "POST"


@pytest.mark.parametrize(
    "body", [b'{"a": "\xff"}', b"\xfe\xff\x00", b"[" * 5000], ids=["latin-1", "bad utf-16", "deep"]
)
def test_a_body_that_cannot_be_decoded_is_invalid_json_not_a_400(body: bytes) -> None:
    answer = TestClient(_two_methods_one_path()).post(
        "/things", content=body, headers={"Content-Type": "application/json"}
    )
    assert answer.status_code == 422 and answer.json()["error"]["code"] == "invalid_json"


def test_post_videos_takes_our_json_and_openais_multipart(schema: dict[str, Any]) -> None:
    operation = schema["paths"]["/v1/videos"]["post"]
    content = operation["requestBody"]["content"]
    assert content["application/json"]["schema"] == {"$ref": "#/components/schemas/VideoRequest"}
    assert content["multipart/form-data"]["schema"] == {"$ref": "#/components/schemas/VideoForm"}
    assert operation["responses"]["202"]["content"]["application/json"]["schema"]["$ref"].endswith("/JobBody")
    assert operation["responses"]["200"]["content"]["application/json"]["schema"]["$ref"].endswith("/Video")
    assert "`unsupported_seconds`" in operation["responses"]["400"]["description"]
    timeout = schema["paths"]["/v1/images/generations"]["post"]["responses"]["504"]
    assert "`generation_timeout`" in timeout["description"] and "x-should-retry" in timeout["headers"]
