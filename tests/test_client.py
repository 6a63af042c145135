"""The Python client's pure parts: the SSE decoder, typed events and their resumable stream, request
building, the retry schedule and the retry loop's decisions, error parsing, output naming, and the
flags `dit-serve generate` makes from the request models. No network: the end-to-end tests against a
real API and worker are in tests/test_client_service.py."""

import argparse
import json
from pathlib import Path

import httpx
import pytest
from pydantic import ValidationError

from cli.generate import add_generate_parser
from cli.progress import describe
from cli.request_flags import given_fields
from dit_serve.client import (
    APIError,
    JobEnded,
    RetryPolicy,
    StreamDroppedError,
    build_submission,
    output_paths,
)
from dit_serve.client.calls import Calls, Send, Sleep
from dit_serve.client.events import EventStream, parse_event
from dit_serve.client.settings import ClientSettings
from dit_serve.client.sse import ServerSentEvent, SSEDecoder
from dit_serve.contract import JobKind
from dit_serve.events import ProgressEvent, QueuedEvent
from dit_serve.idempotency import IDEMPOTENCY_HEADER
from dit_serve.schemas import JobBody

BASE = "http://127.0.0.1:9"
NO_JITTER = RetryPolicy(jitter=0.0)


def _job(status: str = "completed", n: int = 1, output_format: str = "png") -> JobBody:
    """A job object as the API serialises it (built through the API's own response model)."""
    request = dict(
        kind="image", model="img", class_labels=[1] * n, n=n, width=32, height=32, num_inference_steps=4,
        guidance_scale=4.0, seed=7, output_format=output_format,
    )  # fmt: skip
    outputs = [
        dict(
            index=i, url=f"/v1/jobs/j1/outputs/{i}", content_type="image/png", width=32, height=32, seed=7 + i
        )
        for i in range(n if status == "completed" else 0)
    ]
    return JobBody.model_validate(
        dict(
            id="j1",
            kind="image",
            model="img",
            status=status,
            progress=100,
            queue_position=None,
            created_at=1.0,
            started_at=2.0,
            completed_at=3.0,
            request=request,
            outputs=outputs,
            error=None,
            deliveries=[],
        )  # fmt: skip
    )


def _feed(decoder: SSEDecoder, text: str) -> list[ServerSentEvent]:
    events = [decoder.feed(line) for line in text.split("\n")]
    return [event for event in events if event is not None]


# --- the SSE decoder ---------------------------------------------------------------------------


def test_sse_events_fields_comments_and_multiline_data() -> None:
    decoder = SSEDecoder()
    events = _feed(
        decoder,
        ': keep-alive\n\nevent: progress\nid: 5-0\ndata: {"a":\ndata:1}\n\n: ping\ndata: plain\n\n',
    )
    assert events == [
        ServerSentEvent("progress", '{"a":\n1}', "5-0"),
        ServerSentEvent("message", "plain", "5-0"),  # the id carries over; the name does not
    ]


def test_sse_ignores_what_the_spec_ignores_and_keeps_retry() -> None:
    decoder = SSEDecoder()
    assert _feed(decoder, "event: queued\n\n") == []  # no data: not dispatched
    assert _feed(decoder, "id: a\0b\nretry: 1500\nretry: soon\nfoo: bar\ndata:x\n\n") == [
        ServerSentEvent("message", "x", None)  # an id with NUL is ignored; "data:x" has no space
    ]
    assert decoder.retry_ms == 1500
    assert _feed(decoder, "data:  two spaces\n\n")[0].data == " two spaces"  # only one is syntax


# --- typed events and the stream across reconnects ------------------------------------------


def test_events_parse_into_the_contract_types() -> None:
    progress = parse_event(ServerSentEvent("progress", '{"id":"j1","step":2,"steps":4,"percent":50}', "1-0"))
    assert progress == ProgressEvent(id="j1", step=2, steps=4, percent=50)
    queued = parse_event(ServerSentEvent("queued", '{"id":"j1","queue_position":3,"eta_s":1.5}', None))
    assert isinstance(queued, QueuedEvent) and queued.queue_position == 3
    ended = parse_event(ServerSentEvent("completed", _job().model_dump_json(), "9-0"))
    assert isinstance(ended, JobEnded) and ended.job.status == "completed" and ended.type == "completed"
    assert parse_event(ServerSentEvent("something_newer", "{}", None)) is None
    with pytest.raises(ValidationError):
        parse_event(ServerSentEvent("progress", '{"id":"j1"}', None))


def test_a_stream_resumes_from_the_last_event_and_ends_with_the_job() -> None:
    stream = EventStream(Calls(ClientSettings(BASE, api_key="k", retries=NO_JITTER)), "j1")
    first = stream.request()
    assert first.url == f"{BASE}/v1/jobs/j1/events"
    assert first.headers["Accept"] == "text/event-stream" and "Last-Event-ID" not in first.headers
    assert first.headers["Authorization"] == "Bearer k"
    stream.opened(httpx.Response(200))
    for line in ["event: progress", "id: 7-1", 'data: {"id":"j1","step":1,"steps":4,"percent":25}', ""]:
        event = stream.feed(line)
    assert isinstance(event, ProgressEvent) and not stream.ended
    stream.feed("event: progress")  # half an event, then the connection drops
    assert stream.dropped(httpx.ReadError("reset")) == NO_JITTER.backoff_s
    resumed = stream.request()
    assert resumed.headers["Last-Event-ID"] == "7-1"
    stream.opened(httpx.Response(200))
    assert stream.feed(f"data: {_job().model_dump_json()}") is None
    assert stream.feed("") is None  # the half event's name was dropped with its connection: a "message"
    for line in ["event: completed", f"data: {_job().model_dump_json()}", ""]:
        event = stream.feed(line)
    assert isinstance(event, JobEnded) and stream.ended


def test_a_stream_gives_up_on_errors_that_retrying_cannot_fix_and_after_its_attempts() -> None:
    stream = EventStream(Calls(ClientSettings(BASE, retries=RetryPolicy(attempts=2, jitter=0.0))), "j1")
    missing = httpx.Response(404, json={"error": {"code": "job_not_found", "message": "no job j1"}})
    with pytest.raises(APIError) as raised:
        stream.opened(missing)
    with pytest.raises(APIError):
        stream.dropped(raised.value)  # a 404 is not retried
    assert stream.dropped(None) == NO_JITTER.backoff_s  # a clean close before the end: reopen
    with pytest.raises(StreamDroppedError, match="ended 2 times"):
        stream.dropped(None)


# --- requests, retries and errors -------------------------------------------------------------


def test_submissions_are_validated_by_the_api_models_and_send_only_what_was_given() -> None:
    body = build_submission(JobKind.IMAGE, "red circle", n=2, seed=1)
    assert body.model_dump(mode="json", exclude_unset=True) == {"prompt": "red circle", "n": 2, "seed": 1}
    video = build_submission(JobKind.VIDEO, class_labels=[3], num_frames=4, output_format="gif")
    assert video.model_dump(mode="json", exclude_unset=True)["output_format"] == "gif"
    for bad in ({"n": 99}, {"num_frames": 4}, {"colour": "red"}):
        with pytest.raises(ValidationError):
            build_submission(JobKind.IMAGE, "red circle", **bad)
    with pytest.raises(ValidationError, match="exactly one of prompt or class_labels"):
        build_submission(JobKind.IMAGE)


def test_backoff_doubles_to_its_cap_and_follows_retry_after() -> None:
    policy = RetryPolicy(attempts=6, backoff_s=1.0, max_backoff_s=4.0, jitter=0.0)
    assert [policy.delay_s(failures) for failures in range(1, 7)] == [1.0, 2.0, 4.0, 4.0, 4.0, None]
    assert policy.delay_s(1, retry_after_s=7.0) == 7.0
    assert policy.delay_s(1, retry_after_s=policy.max_retry_after_s + 1) is None  # too long: raise
    jittered = RetryPolicy(backoff_s=1.0, jitter=0.5, draw=lambda: 1.0)
    assert jittered.delay_s(1) == 1.5


def _drive(operation, outcomes):  # type: ignore[no-untyped-def]
    """Run a sans-I/O call against a list of outcomes; returns (result, requests sent, sleeps)."""
    sent, slept, outcome = [], [], None
    outcomes = list(outcomes)
    while True:
        try:
            step = operation.send(outcome)
        except StopIteration as done:
            return done.value, sent, slept
        if isinstance(step, Send):
            sent.append(step.request)
            outcome = outcomes.pop(0)
        else:
            assert isinstance(step, Sleep)
            slept.append(step.seconds)
            outcome = None


def _error(status: int, code: str, **headers: str) -> httpx.Response:
    return httpx.Response(status, json={"error": {"code": code, "message": "m"}}, headers=headers)


def test_a_submission_retries_with_one_idempotency_key_and_stops_on_client_errors() -> None:
    calls = Calls(ClientSettings(BASE, retries=NO_JITTER))
    body = build_submission(JobKind.IMAGE, "red circle")
    outcomes = [
        httpx.ReadError("the answer was lost"),
        _error(429, "queue_full", **{"Retry-After": "3"}),
        _error(409, "idempotency_key_in_use"),
        _error(503, "redis_unavailable"),
        httpx.Response(202, content=_job("queued").model_dump_json()),
    ]
    job, sent, slept = _drive(calls.submit(body), outcomes)
    assert job.id == "j1" and len(sent) == 5
    assert len({request.headers[IDEMPOTENCY_HEADER] for request in sent}) == 1
    assert json.loads(sent[0].content) == {"prompt": "red circle"}
    assert slept == [0.5, 3.0, 2.0, 4.0]  # the backoff doubles with each failure; Retry-After wins
    with pytest.raises(APIError) as raised:
        _drive(calls.submit(body), [_error(422, "unknown_model")])
    assert (raised.value.status, raised.value.code, raised.value.message) == (422, "unknown_model", "m")
    _, again, _ = _drive(calls.submit(body), [httpx.Response(202, content=_job().model_dump_json())])
    assert again[0].headers[IDEMPOTENCY_HEADER] != sent[0].headers[IDEMPOTENCY_HEADER]  # a new submission


def test_reads_retry_503_and_transport_errors_only_and_waits_in_slices() -> None:
    calls = Calls(ClientSettings(BASE, retries=RetryPolicy(attempts=2, jitter=0.0)))
    with pytest.raises(APIError) as raised:
        _drive(calls.get("j1"), [_error(429, "rate_limited", **{"Retry-After": "1"})])  # a GET: not retried
    assert raised.value.retry_after_s == 1.0
    with pytest.raises(httpx.ConnectError):
        _drive(calls.get("j1"), [httpx.ConnectError("down"), httpx.ConnectError("still down")])
    running = httpx.Response(200, content=_job("in_progress").model_dump_json())
    done = httpx.Response(200, content=_job("failed").model_dump_json())
    job, sent, _ = _drive(calls.wait("j1"), [running, done])
    assert job.status == "failed" and [r.url.params["wait"] for r in sent] == ["30.0", "30.0"]
    assert sent[0].extensions["timeout"]["read"] > 30.0  # the read timeout covers the wait


def test_error_answers_parse_even_when_not_in_the_api_shape() -> None:
    parsed = APIError.from_response(_error(500, "internal_error"))
    assert str(parsed) == "500 internal_error: m"
    proxy = APIError.from_response(httpx.Response(502, text="<html>Bad Gateway</html>"))
    assert (proxy.status, proxy.code, proxy.message) == (502, "http_error", "<html>Bad Gateway</html>")


def test_settings_come_from_arguments_then_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DIT_URL", "http://127.0.0.1:8123/")
    monkeypatch.setenv("DIT_API_KEY", "dit_env")
    assert ClientSettings.resolve().base_url == "http://127.0.0.1:8123"
    assert ClientSettings.resolve().headers() == {"Authorization": "Bearer dit_env"}
    assert (
        ClientSettings.resolve("http://127.0.0.1:1", "dit_arg").headers()["Authorization"] == "Bearer dit_arg"
    )
    monkeypatch.delenv("DIT_URL")
    monkeypatch.delenv("DIT_API_KEY")
    assert ClientSettings.resolve().base_url == "http://127.0.0.1:8000"
    assert ClientSettings.resolve().headers() == {}


# --- outputs and the command line ----------------------------------------------------------------


def test_output_paths_for_a_file_a_pattern_and_a_directory(tmp_path: Path) -> None:
    assert output_paths(_job(n=1), tmp_path / "out.png") == [tmp_path / "out.png"]
    assert output_paths(_job(n=2), tmp_path / "out.png") == [tmp_path / "out-0.png", tmp_path / "out-1.png"]
    assert output_paths(_job(n=2), f"{tmp_path}/shot{{index}}.png") == [
        tmp_path / "shot0.png",
        tmp_path / "shot1.png",
    ]
    assert output_paths(_job(n=1, output_format="webp"), tmp_path) == [tmp_path / "j1-0.webp"]


def _generate_args(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    add_generate_parser(parser.add_subparsers(dest="command"))
    return parser.parse_args(["generate", *argv])


def test_generate_flags_come_from_the_request_models() -> None:
    args = _generate_args(
        "red circle", "--steps", "4", "-n", "2", "--guidance-scale", "1.5", "--priority", "high"
    )
    fields = given_fields(args, args.request_fields)
    assert fields == {"num_inference_steps": 4, "n": 2, "guidance_scale": 1.5, "priority": "high"}
    assert build_submission(JobKind.IMAGE, args.prompt, **fields).priority == "high"
    video = _generate_args(
        "--video", "--class-labels", "1", "--num-frames", "4", "--format", "gif", "--fps", "4"
    )
    fields = given_fields(video, video.request_fields)
    assert fields == {"class_labels": [1], "num_frames": 4, "output_format": "gif", "fps": 4}
    assert build_submission(JobKind.VIDEO, **fields).num_frames == 4
    with pytest.raises(SystemExit):
        _generate_args("red circle", "--priority", "urgent")  # an enum's values are the choices
    with pytest.raises(SystemExit):
        _generate_args("red circle", "--seed", "seven")


def test_progress_lines_show_queue_position_steps_and_eta() -> None:
    assert describe(QueuedEvent(id="j", queue_position=2, eta_s=4.25)) == "queued: position 2, eta 4.2 s"
    line = describe(ProgressEvent(id="j", step=3, steps=4, percent=75, eta_s=0.5))
    assert line == "[" + "#" * 18 + "-" * 6 + "] step 3/4  75%, eta 0.5 s"
    assert describe(JobEnded(type="failed", job=_job("failed"))) == "failed"
