"""The asyncio client: drives the calls of dit_serve/client/calls.py with httpx.AsyncClient."""

import asyncio
from collections.abc import AsyncIterator, Callable
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


class AsyncClient(ClientBase[httpx.AsyncClient]):
    """A dit-serve API client for asyncio, with the same methods as `Client`, awaited; use it as an
    async context manager, or await `close()`."""

    http_class = httpx.AsyncClient

    async def _run(self, operation: Operation[T]) -> T:
        outcome: Outcome = None
        while True:
            try:
                step = operation.send(outcome)
            except StopIteration as done:
                return done.value  # type: ignore[no-any-return]
            if isinstance(step, Send):
                try:
                    outcome = await self._http.send(step.request)
                except httpx.TransportError as exc:
                    outcome = exc
            else:
                await asyncio.sleep(step.seconds)
                outcome = None

    async def submit(self, request: Submission, idempotency_key: str | None = None) -> JobBody:
        """Submit a job (an ImageRequest or VideoRequest); retried without creating a second job."""
        return await self._run(self._calls.submit(request, idempotency_key))

    async def submit_image(
        self, prompt: str | None = None, *, idempotency_key: str | None = None, **fields: Any
    ) -> JobBody:
        return await self.submit(build_submission(JobKind.IMAGE, prompt, **fields), idempotency_key)

    async def submit_video(
        self, prompt: str | None = None, *, idempotency_key: str | None = None, **fields: Any
    ) -> JobBody:
        return await self.submit(build_submission(JobKind.VIDEO, prompt, **fields), idempotency_key)

    async def get(self, job_id: str) -> JobBody:
        return await self._run(self._calls.get(job_id))

    async def wait(self, job_id: str, timeout_s: float | None = None) -> JobBody:
        """The job once it has ended, however it ended; WaitTimeoutError after `timeout_s`."""
        return await self._run(self._calls.wait(job_id, timeout_s))

    async def cancel(self, job_id: str) -> JobBody:
        return await self._run(self._calls.cancel(job_id))

    async def download(self, job: JobBody, index: int = 0) -> bytes:
        return await self._run(self._calls.download(job, index))

    async def save(self, job: JobBody, target: str | Path) -> list[Path]:
        """Download every output of `job` to files (named as `output_paths` says); returns the paths."""
        paths = output_paths(job, target)
        for index, path in enumerate(paths):
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(await self.download(job, index))
        return paths

    async def models(self) -> list[ModelSpec]:
        return await self._run(self._calls.models())

    async def events(self, job_id: str) -> AsyncIterator[JobEvent]:
        """The job's live events, ending with a JobEnded; reconnects with Last-Event-ID when dropped."""
        stream = EventStream(self._calls, job_id)
        while not stream.ended:
            failure: APIError | httpx.TransportError | None = None
            try:
                response = await self._http.send(stream.request(), stream=True)
                try:
                    if not response.is_success:
                        await response.aread()
                    stream.opened(response)
                    async for line in response.aiter_lines():
                        if (event := stream.feed(line)) is not None:
                            yield event
                finally:
                    await response.aclose()
            except (APIError, httpx.TransportError) as exc:
                failure = exc
            if not stream.ended:
                await asyncio.sleep(stream.dropped(failure))

    async def generate(
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
        job = await self.submit(build_submission(kind, prompt, **fields))
        if on_event is None:
            job = await self.wait(job.id, timeout_s)
        else:
            async for event in self.events(job.id):
                on_event(event)
                if isinstance(event, JobEnded):
                    job = event.job
        return completed(job)

    async def generate_image(self, prompt: str | None = None, **options: Any) -> JobBody:
        return await self.generate(JobKind.IMAGE, prompt, **options)

    async def generate_video(self, prompt: str | None = None, **options: Any) -> JobBody:
        return await self.generate(JobKind.VIDEO, prompt, **options)

    async def close(self) -> None:
        await self._http.aclose()

    async def __aenter__(self) -> "AsyncClient":
        return self

    async def __aexit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.close()
