"""The Python client and `dit-serve generate` against a real API and worker (tiny real models), over
real HTTP: submit, wait, events, downloads, typed errors, and retries that never create a second job
(through a proxy on 127.0.0.1 that loses an answer or cuts a stream)."""

import asyncio
import base64
import io
import json
import os
import re
import signal
import subprocess
import sys
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import httpx
import pytest
from PIL import Image

from dit_serve.client import (
    APIError,
    AsyncClient,
    Client,
    JobEnded,
    JobEvent,
    JobFailedError,
    PreviewEvent,
    ProgressEvent,
    RetryPolicy,
)
from tests.conftest import Service, paused

STEPS = 4
CLI_TIMEOUT_S = 120.0
HOP_HEADERS = frozenset(
    {"connection", "keep-alive", "transfer-encoding", "content-length", "content-encoding"}
)
FAST_RETRIES = RetryPolicy(backoff_s=0.2, jitter=0.0)


def _png(data: bytes) -> Image.Image:
    image = Image.open(io.BytesIO(data))
    assert image.format == "PNG"
    return image.convert("RGB")


def _job_ids(service: Service) -> set[str]:
    with service.client() as http:
        return {job["id"] for job in http.get("/v1/jobs", params={"limit": 100}).json()["data"]}


# --- a proxy that loses answers ------------------------------------------------------------------


class _Proxy(ThreadingHTTPServer):
    """Forwards to the API; loses the answers of the first `lose_posts` POSTs (after the API has
    acted on them), and cuts the first event stream after `cut_after_events` events."""

    daemon_threads = True

    def __init__(self, upstream: str, lose_posts: int = 0, cut_after_events: int | None = None):
        super().__init__(("127.0.0.1", 0), _ProxyHandler)
        self.upstream = upstream
        self.lose_posts = lose_posts
        self.cut_after_events = cut_after_events
        self.seen: list[tuple[str, str, httpx.Headers]] = []  # (method, path, headers) in order
        self.answers: list[httpx.Headers] = []  # the API's headers of each POST answer, lost or not

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}"


class _ProxyHandler(BaseHTTPRequestHandler):
    server: _Proxy

    def log_message(self, *_args: object) -> None:
        pass

    def do_GET(self) -> None:  # noqa: N802 - http.server's naming
        self._forward()

    do_POST = do_DELETE = do_GET  # noqa: N815

    def _forward(self) -> None:
        proxy = self.server
        length = int(self.headers.get("Content-Length") or 0)
        body = self.rfile.read(length) if length else None
        headers = {k: v for k, v in self.headers.items() if k.lower() not in HOP_HEADERS | {"host"}}
        proxy.seen.append((self.command, self.path, httpx.Headers(headers)))
        url = proxy.upstream + self.path
        with httpx.stream(self.command, url, content=body, headers=headers, timeout=120) as response:
            if response.headers.get("content-type", "").startswith("text/event-stream"):
                self._relay_stream(response)
                return
            content = response.read()
            if self.command == "POST":
                proxy.answers.append(response.headers)
                if proxy.lose_posts:
                    proxy.lose_posts -= 1
                    return  # the job exists now; the connection closes without its answer
            self._start(response)
            self.send_header("Content-Length", str(len(content)))
            self.end_headers()
            self.wfile.write(content)

    def _start(self, response: httpx.Response) -> None:
        self.send_response(response.status_code)
        for key, value in response.headers.items():
            if key.lower() not in HOP_HEADERS:
                self.send_header(key, value)

    def _relay_stream(self, response: httpx.Response) -> None:
        """Relay an event stream line by line; cut the first one after `cut_after_events` events."""
        cut_after, self.server.cut_after_events = self.server.cut_after_events, None
        self._start(response)
        self.end_headers()
        events, has_data = 0, False
        for line in response.iter_lines():
            self.wfile.write(line.encode() + b"\n")
            self.wfile.flush()
            if line.startswith("data:"):
                has_data = True
            elif line == "" and has_data:  # a blank line ends an event (comments alone are none)
                events, has_data = events + 1, False
            if cut_after is not None and events >= cut_after:
                return  # an HTTP/1.0 body without a length: closing ends it early, cleanly


@pytest.fixture
def proxy(service: Service, request: pytest.FixtureRequest) -> Iterator[_Proxy]:
    server = _Proxy(service.base_url, **getattr(request, "param", {}))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server
    server.shutdown()
    server.server_close()


# --- the sync client -----------------------------------------------------------------------------


def test_sync_client_submits_waits_downloads_and_saves(service: Service, tmp_path: Path) -> None:
    with Client(service.base_url) as client:
        assert {model.name for model in client.models()} == {"img", "vid"}
        job = client.submit_image("red circle", n=2, seed=11, num_inference_steps=STEPS)
        assert job.status in ("queued", "in_progress") and job.request.seed == 11
        done = client.wait(job.id, timeout_s=60)
        assert done.status == "completed" and len(done.outputs) == 2
        assert done.outputs[1].seed == 12
        first = client.download(done, 0)
        assert _png(first).size == (32, 32)
        paths = client.save(done, tmp_path / "circle.png")
        assert paths == [tmp_path / "circle-0.png", tmp_path / "circle-1.png"]
        assert paths[0].read_bytes() == first
        assert _png(paths[1].read_bytes()).size == (32, 32)
        assert client.get(job.id) == done


def test_events_stream_progress_previews_and_the_final_job(service: Service) -> None:
    seen: list[JobEvent] = []
    with Client(service.base_url) as client:
        job = client.generate_image(
            class_labels=[2], num_inference_steps=STEPS, previews=1, seed=5, on_event=seen.append
        )
    assert job.status == "completed" and isinstance(seen[-1], JobEnded) and seen[-1].job == job
    steps = [event.step for event in seen if isinstance(event, ProgressEvent)]
    assert steps == list(range(1, STEPS + 1))
    previews = [event for event in seen if isinstance(event, PreviewEvent)]
    assert [event.step for event in previews] == list(range(1, STEPS))  # each step's but the last
    assert _png(base64.b64decode(previews[0].b64_json)).size == (previews[0].width, previews[0].height)


@pytest.mark.parametrize("proxy", [{"cut_after_events": 2}], indirect=True)
def test_a_cut_event_stream_resumes_from_the_last_event(service: Service, proxy: _Proxy) -> None:
    with Client(proxy.url, retries=FAST_RETRIES) as client:
        job = client.submit_image("red circle", num_inference_steps=STEPS)
        events = list(client.events(job.id))
    streams = [headers for method, path, headers in proxy.seen if path.endswith("/events")]
    assert len(streams) == 2, proxy.seen
    assert "Last-Event-ID" not in streams[0] and streams[1]["Last-Event-ID"]
    steps = [event.step for event in events if isinstance(event, ProgressEvent)]
    assert steps == list(range(1, STEPS + 1))  # nothing lost, nothing twice
    assert isinstance(events[-1], JobEnded) and events[-1].job.status == "completed"


def test_errors_are_typed_with_status_and_code(service: Service) -> None:
    with Client(service.base_url) as client:
        with pytest.raises(APIError) as unknown:
            client.submit_image("red circle", model="no-such-model")
        assert (unknown.value.status, unknown.value.code) == (422, "unknown_model")
        assert "no-such-model" in unknown.value.message
        with pytest.raises(APIError) as missing:
            client.get("nope")
        assert (missing.value.status, missing.value.code) == (404, "job_not_found")


def test_a_job_that_does_not_complete_raises_job_failed(service: Service) -> None:
    with Client(service.base_url) as client, paused(service.workers[0]):  # the job stays queued

        def cancel_at_first_event(event: JobEvent) -> None:
            if not isinstance(event, JobEnded):
                client.cancel(event.id)

        with pytest.raises(JobFailedError, match="canceled") as failed:
            client.generate_image("red circle", on_event=cancel_at_first_event)
    assert failed.value.job.status == "canceled" and failed.value.job.outputs == []


@pytest.mark.parametrize("proxy", [{"lose_posts": 1}], indirect=True)
def test_a_submission_whose_answer_is_lost_creates_one_job(service: Service, proxy: _Proxy) -> None:
    before = _job_ids(service)
    with Client(proxy.url, retries=FAST_RETRIES) as client:
        job = client.submit_image("red circle", num_inference_steps=STEPS)
        assert client.wait(job.id, timeout_s=60).status == "completed"
    posts = [headers for method, _, headers in proxy.seen if method == "POST"]
    assert len(posts) == 2 and posts[0]["idempotency-key"] == posts[1]["idempotency-key"]
    assert [answer.get("idempotent-replayed") for answer in proxy.answers] == [None, "true"]
    assert _job_ids(service) - before == {job.id}


# --- the async client ----------------------------------------------------------------------------


def test_async_client_submits_follows_events_and_downloads(service: Service, tmp_path: Path) -> None:
    async def scenario() -> tuple[list[JobEvent], bytes, list[Path]]:
        async with AsyncClient(service.base_url) as client:
            assert "img" in {model.name for model in await client.models()}
            job = await client.submit_image("blue square", num_inference_steps=STEPS, seed=3)
            events = [event async for event in client.events(job.id)]
            done = await client.wait(job.id, timeout_s=60)
            with pytest.raises(APIError) as ended:
                await client.cancel(job.id)
            assert ended.value.code == "job_finished"
            return events, await client.download(done), await client.save(done, tmp_path)

    events, data, paths = asyncio.run(scenario())
    assert [e.step for e in events if isinstance(e, ProgressEvent)] == list(range(1, STEPS + 1))
    assert isinstance(events[-1], JobEnded) and events[-1].job.status == "completed"
    assert _png(data).size == (32, 32) and paths[0].read_bytes() == data
    assert paths[0].name == f"{events[-1].job.id}-0.png"


# --- dit-serve generate --------------------------------------------------------------------------


def _generate(service: Service, *args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "DIT_URL": service.base_url}
    return subprocess.run(
        [sys.executable, "-m", "cli", "generate", *args],
        cwd=cwd, env=env, capture_output=True, text=True, timeout=CLI_TIMEOUT_S,
    )  # fmt: skip


def test_generate_saves_a_png_and_shows_step_progress(service: Service, tmp_path: Path) -> None:
    result = _generate(
        service, "red circle", "--steps", str(STEPS), "--seed", "9", "-o", "out.png", cwd=tmp_path
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == [str(tmp_path / "out.png")] or result.stdout.split() == ["out.png"]
    assert _png((tmp_path / "out.png").read_bytes()).size == (32, 32)
    assert f"step {STEPS}/{STEPS}" in result.stderr and "completed" in result.stderr
    # the job as submitted: queued, or already taken by the idle worker before the answer was read back
    assert "started" in result.stderr
    assert re.search(r"^job [0-9a-f]{32} (queued, position \d+|in_progress)$", result.stderr, re.MULTILINE)


def test_generate_json_prints_only_the_job_and_names_several_outputs(
    service: Service, tmp_path: Path
) -> None:
    result = _generate(
        service, "--class-labels", "1", "-n", "2", "--steps", "2", "--json", "-o", "shot.png", cwd=tmp_path
    )
    assert result.returncode == 0, result.stderr
    job = json.loads(result.stdout)  # stdout is the job object and nothing else
    assert job["status"] == "completed" and job["request"]["class_labels"] == [1, 1]
    for index in range(2):
        assert _png((tmp_path / f"shot-{index}.png").read_bytes()).size == (32, 32)
    assert "step 2/2" in result.stderr


def test_generate_fails_with_the_apis_error(service: Service, tmp_path: Path) -> None:
    result = _generate(service, "red circle", "--model", "no-such-model", cwd=tmp_path)
    assert result.returncode == 1 and result.stdout == ""
    assert "422 unknown_model" in result.stderr
    invalid = _generate(service, "red circle", "--fps", "4", cwd=tmp_path)
    assert invalid.returncode == 1 and "fps" in invalid.stderr and "--video" in invalid.stderr


def test_ctrl_c_cancels_the_job(service: Service, tmp_path: Path) -> None:
    # PYTHONFAULTHANDLER: if the command ever hangs, a SIGABRT makes it print where (every thread)
    env = {**os.environ, "DIT_URL": service.base_url, "PYTHONFAULTHANDLER": "1"}
    with paused(service.workers[0]):  # the job stays queued, however fast the machine
        # SIGINT as a terminal delivers it: a runner started in the background (`cmd &` in a script)
        # passes its children SIGINT ignored, and Python then keeps it ignored
        process = subprocess.Popen(
            [sys.executable, "-m", "cli", "generate", "red circle", "-o", "never.png"],
            cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
        )  # fmt: skip
        assert process.stderr is not None
        first = process.stderr.readline()  # "job <id> queued, position 0", once it is submitted
        assert " queued" in first, first
        job_id = first.split()[1]
        process.send_signal(signal.SIGINT)
        try:
            _, rest = process.communicate(timeout=CLI_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            process.send_signal(signal.SIGABRT)
            _, stacks = process.communicate(timeout=30)
            pytest.fail(f"dit-serve generate hung after Ctrl-C; its threads:\n{stacks}")
    assert process.returncode == 130, rest
    assert f"canceled job {job_id}" in rest
    with Client(service.base_url) as client:
        assert client.get(job_id).status == "canceled"
    assert not (tmp_path / "never.png").exists()
