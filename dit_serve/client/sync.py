"""The blocking client: drives the calls of dit_serve/client/calls.py with httpx.Client."""

import time
from collections.abc import Callable, Iterator
from pathlib import Path
from types import TracebackType
from typing import Any, TypeVar

import httpx

from dit_serve.client.calls import (
    ClientBase,
    Operation,
    Outcome,
    Send,
    Submission,
    build_submission,
    completed,
)
from dit_serve.client.errors import APIError
from dit_serve.client.events import EventStream, JobEnded, JobEvent
from dit_serve.client.outputs import output_paths
from dit_serve.contract import JobKind, ModelSpec
from dit_serve.schemas import JobBody

T = TypeVar("T")


class Client(ClientBase[httpx.Client]):
    """A dit-serve API client. `base_url` defaults to `DIT_URL`, else http://127.0.0.1:8000, and
    `api_key` to `DIT_API_KEY`; use it as a context manager, or call `close()`."""

    http_class = httpx.Client

    def _run(self, operation: Operation[T]) -> T:
        outcome: Outcome = None
        while True:
            try:
                step = operation.send(outcome)
            except StopIteration as done:
                return done.value  # type: ignore[no-any-return]
            if isinstance(step, Send):
                try:
                    outcome = self._http.send(step.request)
                except httpx.TransportError as exc:
                    outcome = exc
            else:
                time.sleep(step.seconds)
                outcome = None

    def submit(self, request: Submission, idempotency_key: str | None = None) -> JobBody:
        """Submit a job (an ImageRequest or VideoRequest); retried without creating a second job."""
        return self._run(self._calls.submit(request, idempotency_key))

    def submit_image(
        self, prompt: str | None = None, *, idempotency_key: str | None = None, **fields: Any
    ) -> JobBody:
        return self.submit(build_submission(JobKind.IMAGE, prompt, **fields), idempotency_key)

    def submit_video(
        self, prompt: str | None = None, *, idempotency_key: str | None = None, **fields: Any
    ) -> JobBody:
        return self.submit(build_submission(JobKind.VIDEO, prompt, **fields), idempotency_key)

    def get(self, job_id: str) -> JobBody:
        return self._run(self._calls.get(job_id))

    def wait(self, job_id: str, timeout_s: float | None = None) -> JobBody:
        """The job once it has ended, however it ended; WaitTimeoutError after `timeout_s`."""
        return self._run(self._calls.wait(job_id, timeout_s))

    def cancel(self, job_id: str) -> JobBody:
        return self._run(self._calls.cancel(job_id))

    def download(self, job: JobBody, index: int = 0) -> bytes:
        return self._run(self._calls.download(job, index))

    def save(self, job: JobBody, target: str | Path) -> list[Path]:
        """Download every output of `job` to files (named as `output_paths` says); returns the paths."""
        paths = output_paths(job, target)
        for index, path in enumerate(paths):
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(self.download(job, index))
        return paths

    def models(self) -> list[ModelSpec]:
        return self._run(self._calls.models())

    def events(self, job_id: str) -> Iterator[JobEvent]:
        """The job's live events, ending with a JobEnded; reconnects with Last-Event-ID when dropped."""
        stream = EventStream(self._calls, job_id)
        while not stream.ended:
            failure: APIError | httpx.TransportError | None = None
            try:
                response = self._http.send(stream.request(), stream=True)
                try:
                    if not response.is_success:
                        response.read()
                    stream.opened(response)
                    for line in response.iter_lines():
                        if (event := stream.feed(line)) is not None:
                            yield event
                finally:
                    response.close()
            except (APIError, httpx.TransportError) as exc:
                failure = exc
            if not stream.ended:
                time.sleep(stream.dropped(failure))

    def generate(
        self,
        kind: JobKind,
        prompt: str | None = None,
        *,
        timeout_s: float | None = None,
        on_event: Callable[[JobEvent], None] | None = None,
        **fields: Any,
    ) -> JobBody:
        """Submit and wait: the completed job, or JobFailedError. With `on_event`, the job is followed
        through its event stream (to its end: `timeout_s` bounds only the wait without it)."""
        job = self.submit(build_submission(kind, prompt, **fields))
        if on_event is None:
            job = self.wait(job.id, timeout_s)
        else:
            for event in self.events(job.id):
                on_event(event)
                if isinstance(event, JobEnded):
                    job = event.job
        return completed(job)

    def generate_image(self, prompt: str | None = None, **options: Any) -> JobBody:
        return self.generate(JobKind.IMAGE, prompt, **options)

    def generate_video(self, prompt: str | None = None, **options: Any) -> JobBody:
        return self.generate(JobKind.VIDEO, prompt, **options)

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> "Client":
        return self

    def __exit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()
