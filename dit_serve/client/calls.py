"""Every call of the client, written once and without I/O, for the sync and async clients to drive.

A call is a generator: it yields a `Send` (an HTTP request to make) or a `Sleep` (a backoff to wait
out) and is sent back the response, or the `httpx.TransportError` that came instead of one. Its return
value is the call's result. `Client` drives it with `httpx.Client` and `time.sleep`, `AsyncClient`
with `httpx.AsyncClient` and `asyncio.sleep`, so request building, retries, the wait loop and parsing
exist once (the "sans-I/O" style of h11 and hyper-h2).
"""

import time
import uuid
from collections.abc import Generator
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

import httpx

from dit_serve.client.errors import APIError, JobFailedError, WaitTimeoutError
from dit_serve.client.retries import CallKind, RetryPolicy, retryable
from dit_serve.client.settings import DEFAULT_TIMEOUT_S, ClientSettings
from dit_serve.contract import JobKind, ModelSpec
from dit_serve.idempotency import IDEMPOTENCY_HEADER
from dit_serve.jobs import ENDED_STATUSES, JobStatus
from dit_serve.schemas import ImageRequest, JobBody, ModelList, VideoRequest

T = TypeVar("T")
HTTP = TypeVar("HTTP", httpx.Client, httpx.AsyncClient)

# One slice of a wait: a GET /v1/jobs/{id}?wait= of at most this long (the API takes up to 60 s);
# shorter slices keep each request well under the idle timeouts of proxies in between.
WAIT_SLICE_S = 30.0
SUBMIT_PATHS = {JobKind.IMAGE: "/v1/images", JobKind.VIDEO: "/v1/videos"}
REQUEST_MODELS: dict[JobKind, type[ImageRequest] | type[VideoRequest]] = {
    JobKind.IMAGE: ImageRequest,
    JobKind.VIDEO: VideoRequest,
}
Submission = ImageRequest | VideoRequest


@dataclass(frozen=True)
class Send:
    request: httpx.Request


@dataclass(frozen=True)
class Sleep:
    seconds: float


Step = Send | Sleep
Outcome = httpx.Response | httpx.TransportError | None  # None: the answer to a Sleep
Operation = Generator[Step, Outcome, T]


def build_submission(kind: JobKind, prompt: str | None = None, **fields: Any) -> Submission:
    """The typed request body for `kind` (fields as in the README's request table); pydantic's
    ValidationError, before anything is sent, when a field is unknown or out of range: the API's own
    request models check it."""
    if prompt is not None:
        fields["prompt"] = prompt
    return REQUEST_MODELS[kind].model_validate(fields)


def completed(job: JobBody) -> JobBody:
    """`job` if it completed; JobFailedError if it failed or was canceled."""
    if job.status != JobStatus.COMPLETED:
        raise JobFailedError(job)
    return job


def new_idempotency_key() -> str:
    """One per logical submission, reused by each of its retries."""
    return uuid.uuid4().hex


def job_path(job_id: str) -> str:
    return f"/v1/jobs/{job_id}"


class Calls:
    """Builds the API's requests, retries them by the settings' policy and parses the answers."""

    def __init__(self, settings: ClientSettings):
        self.settings = settings

    def request(
        self,
        method: str,
        path_or_url: str,
        *,
        params: dict[str, Any] | None = None,
        json: Any = None,
        headers: dict[str, str] | None = None,
        read_timeout_s: float | None = None,
    ) -> httpx.Request:
        """A request to the API (`path_or_url` may be absolute, as an output's URL can be)."""
        url = path_or_url if "://" in path_or_url else self.settings.base_url + path_or_url
        timeout = httpx.Timeout(self.settings.timeout_s, read=read_timeout_s or self.settings.timeout_s)
        return httpx.Request(
            method,
            url,
            params=params,
            json=json,
            headers={**self.settings.headers(), **(headers or {})},
            extensions={"timeout": timeout.as_dict()},
        )

    def call(self, request: httpx.Request, kind: CallKind) -> Operation[httpx.Response]:
        """Send `request` until it succeeds; the last failure is raised (APIError for an error answer,
        httpx.TransportError for none) once it is not retryable or the attempts are spent."""
        failures = 0
        while True:
            outcome = yield Send(request)
            if isinstance(outcome, httpx.Response) and outcome.is_success:
                return outcome
            assert outcome is not None, "a Send is answered with a response or a transport error"
            failure = (
                outcome if isinstance(outcome, httpx.TransportError) else APIError.from_response(outcome)
            )
            failures += 1
            retry_after_s = failure.retry_after_s if isinstance(failure, APIError) else None
            delay_s = self.settings.retries.delay_s(failures, retry_after_s)
            if delay_s is None or not retryable(kind, failure):
                raise failure
            yield Sleep(delay_s)

    def submit(self, body: Submission, idempotency_key: str | None = None) -> Operation[JobBody]:
        """POST the job; every retry carries the same Idempotency-Key, so at most one job is created."""
        kind = JobKind.VIDEO if isinstance(body, VideoRequest) else JobKind.IMAGE
        request = self.request(
            "POST",
            SUBMIT_PATHS[kind],
            json=body.model_dump(mode="json", exclude_unset=True),  # the server fills the defaults
            headers={IDEMPOTENCY_HEADER: idempotency_key or new_idempotency_key()},
        )
        response = yield from self.call(request, CallKind.SUBMIT)
        return JobBody.model_validate_json(response.content)

    def get(self, job_id: str, wait_s: float = 0.0) -> Operation[JobBody]:
        params = {"wait": wait_s} if wait_s > 0 else None
        request = self.request(
            "GET", job_path(job_id), params=params, read_timeout_s=self.settings.timeout_s + wait_s
        )
        response = yield from self.call(request, CallKind.READ)
        return JobBody.model_validate_json(response.content)

    def wait(self, job_id: str, timeout_s: float | None = None) -> Operation[JobBody]:
        """The job once it has ended (completed, failed or canceled), by waiting GETs of WAIT_SLICE_S;
        WaitTimeoutError after `timeout_s` (None: no limit)."""
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        while True:
            remaining_s = WAIT_SLICE_S if deadline is None else max(0.0, deadline - time.monotonic())
            job = yield from self.get(job_id, wait_s=min(remaining_s, WAIT_SLICE_S))
            if job.status in ENDED_STATUSES:
                return job
            if deadline is not None and time.monotonic() >= deadline:
                raise WaitTimeoutError(job, timeout_s or 0.0)

    def cancel(self, job_id: str) -> Operation[JobBody]:
        """DELETE the job: canceled at once if queued, at its next step if running; APIError 409
        `job_finished` if it had already ended."""
        response = yield from self.call(self.request("DELETE", job_path(job_id)), CallKind.READ)
        return JobBody.model_validate_json(response.content)

    def download(self, job: JobBody, index: int = 0) -> Operation[bytes]:
        """The bytes of output `index` of a completed job."""
        if not 0 <= index < len(job.outputs):
            raise IndexError(f"job {job.id} has {len(job.outputs)} outputs (status {job.status}), no {index}")
        response = yield from self.call(self.request("GET", job.outputs[index].url), CallKind.READ)
        return response.content

    def models(self) -> Operation[list[ModelSpec]]:
        response = yield from self.call(self.request("GET", "/v1/models"), CallKind.READ)
        return ModelList.model_validate_json(response.content).data


class ClientBase(Generic[HTTP]):
    """What `Client` and `AsyncClient` share: settings from arguments or the environment, the calls
    built on them, and an httpx client of the subclass's `http_class` to send them with."""

    http_class: type[HTTP]

    def __init__(
        self,
        base_url: str | None = None,
        api_key: str | None = None,
        *,
        timeout_s: float = DEFAULT_TIMEOUT_S,
        retries: RetryPolicy | None = None,
    ):
        """`base_url` defaults to `DIT_URL`, else http://127.0.0.1:8000; `api_key` to `DIT_API_KEY`."""
        self.settings = ClientSettings.resolve(base_url, api_key, timeout_s, retries)
        self._calls = Calls(self.settings)
        self._http: HTTP = self.http_class()
