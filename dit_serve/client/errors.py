"""The client's exceptions: an error answer of the API, a job that did not complete, a wait that ran out."""

import httpx
from pydantic import ValidationError

from dit_serve.schemas import ErrorBody, JobBody

UNPARSED_CODE = "http_error"  # an error answer not in the API's shape (a proxy's page, say)
UNPARSED_CHARS = 300  # how much of such an answer the message keeps


class DitServeError(Exception):
    """Anything the client raises on purpose."""


class APIError(DitServeError):
    """The API answered with an error: `{"error": {"code", "message", "request_id"?}}`."""

    def __init__(
        self,
        status: int,
        code: str,
        message: str,
        request_id: str | None = None,
        retry_after_s: float | None = None,
    ):
        super().__init__(f"{status} {code}: {message}")
        self.status = status
        self.code = code
        self.message = message
        self.request_id = request_id
        self.retry_after_s = retry_after_s  # from the Retry-After header (429), in seconds

    @classmethod
    def from_response(cls, response: httpx.Response) -> "APIError":
        retry_after = response.headers.get("Retry-After")
        retry_after_s = float(retry_after) if retry_after and retry_after.isdigit() else None
        try:
            detail = ErrorBody.model_validate_json(response.content).error
        except ValidationError:
            text = response.text[:UNPARSED_CHARS]
            return cls(
                response.status_code, UNPARSED_CODE, text or response.reason_phrase, None, retry_after_s
            )
        return cls(response.status_code, detail.code, detail.message, detail.request_id, retry_after_s)


class JobFailedError(DitServeError):
    """A job ended failed or canceled where the caller wanted it completed; `job` says how it ended."""

    def __init__(self, job: JobBody):
        reason = f": {job.error.code}: {job.error.message}" if job.error else ""
        super().__init__(f"job {job.id} {job.status}{reason}")
        self.job = job


class WaitTimeoutError(DitServeError, TimeoutError):
    """A job had not ended when the wait ran out; `job` is how it stood then."""

    def __init__(self, job: JobBody, timeout_s: float):
        super().__init__(
            f"job {job.id} is still {job.status} after {timeout_s:g} s; wait again, or cancel it"
        )
        self.job = job
        self.timeout_s = timeout_s
