"""The body limit and request id middlewares in-process, on a small app with the API's error handlers."""

from collections.abc import Iterator

from fastapi import FastAPI, Request
from fastapi.testclient import TestClient

from app.errors import install_error_handlers
from app.middleware import BodyLimit, RequestID

LIMIT = 1000


def _app() -> tuple[FastAPI, list[int], list[tuple[int, str]]]:
    """An app whose POST /echo reads the body; returns it, the body sizes read and the errors told."""
    app = FastAPI()
    read: list[int] = []
    told: list[tuple[int, str]] = []

    @app.post("/echo")
    async def echo(request: Request) -> dict[str, int]:
        read.append(len(await request.body()))
        return {"bytes": read[-1]}

    @app.get("/boom")
    def boom() -> None:
        raise RuntimeError("secret-host:6379 refused")

    app.add_middleware(BodyLimit, max_bytes=LIMIT, on_error=lambda _request, status, code: None)
    install_error_handlers(app, lambda _request, status, code: told.append((status, code)))
    app.add_middleware(RequestID)
    return app, read, told


def _chunks(total: int) -> Iterator[bytes]:
    for start in range(0, total, 100):
        yield b"x" * min(100, total - start)


def test_a_content_length_over_the_limit_is_refused_before_the_app_reads_it() -> None:
    app, read, _ = _app()
    response = TestClient(app).post("/echo", content=b"x" * (LIMIT + 1))
    assert response.status_code == 413 and read == []
    assert response.json() == {
        "error": {"code": "body_too_large", "message": response.json()["error"]["message"]}
    }
    assert str(LIMIT) in response.json()["error"]["message"]


def test_a_chunked_body_is_counted_and_stopped_at_the_limit() -> None:
    app, read, told = _app()
    client = TestClient(app)
    over = client.post("/echo", content=_chunks(LIMIT + 1))
    assert over.status_code == 413 and over.json()["error"]["code"] == "body_too_large"
    assert read == [] and told == [(413, "body_too_large")]
    assert client.post("/echo", content=_chunks(LIMIT)).json() == {"bytes": LIMIT}
    assert client.post("/echo", content=b"x" * LIMIT).json() == {"bytes": LIMIT}


def test_a_request_id_is_echoed_when_well_formed_and_replaced_otherwise() -> None:
    client = TestClient(_app()[0], raise_server_exceptions=False)
    assert client.get("/boom", headers={"X-Request-ID": "abc-123"}).headers["x-request-id"] == "abc-123"
    for bad in ("x" * 129, "bell\x07", "a b", "semi;colon"):
        fresh = client.post("/echo", content=b"{}", headers={"X-Request-ID": bad}).headers["x-request-id"]
        assert fresh != bad and len(fresh) == 32
    assert client.get("/nowhere").headers["x-request-id"]


def test_a_500_names_the_request_id_and_not_the_exception() -> None:
    response = TestClient(_app()[0], raise_server_exceptions=False).get("/boom")
    error = response.json()["error"]
    assert response.status_code == 500 and error["code"] == "internal_error"
    assert error["request_id"] == response.headers["x-request-id"]
    assert "secret-host" not in response.text and "RuntimeError" not in response.text
