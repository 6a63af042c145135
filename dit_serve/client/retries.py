"""When a failed call is tried again, and after how long: exponential backoff, or the server's Retry-After."""

import random
from collections.abc import Callable
from dataclasses import dataclass, field
from enum import Enum

import httpx

from dit_serve.client.errors import APIError

# 503: Redis or every worker briefly gone (a restart). 429: a rate, quota or queue limit, with Retry-After.
# 409 idempotency_key_in_use: our own first attempt is still being accepted; its answer is coming.
RETRY_STATUSES_READ = frozenset({503})
RETRY_STATUSES_SUBMIT = frozenset({429, 503})
KEY_IN_USE = "idempotency_key_in_use"


class CallKind(Enum):
    """What a call may safely repeat."""

    READ = "read"  # GET and DELETE: repeating one changes nothing
    SUBMIT = "submit"  # POST with an Idempotency-Key: a repeat returns the first attempt's job


@dataclass(frozen=True)
class RetryPolicy:
    """How often and how long to retry a call that failed in a way a later attempt may not."""

    attempts: int = 5  # tries in all, the first included
    backoff_s: float = 0.5  # the wait after the first failure; doubled after each next one
    max_backoff_s: float = 30.0
    max_retry_after_s: float = 60.0  # a longer Retry-After than this is not waited out: the error is raised
    jitter: float = 0.25  # each wait is stretched by up to this fraction, so clients spread out
    draw: Callable[[], float] = field(default=random.random, compare=False, repr=False)

    def delay_s(self, failures: int, retry_after_s: float | None = None) -> float | None:
        """The wait before the next attempt after `failures` failed ones; None: give up."""
        if failures >= self.attempts:
            return None
        if retry_after_s is not None:
            return retry_after_s if retry_after_s <= self.max_retry_after_s else None
        backoff = min(self.backoff_s * 2 ** (failures - 1), self.max_backoff_s)
        return backoff * (1 + self.jitter * self.draw())


def retryable(kind: CallKind, failure: APIError | httpx.TransportError) -> bool:
    """Whether a failed attempt (an error answer, or no answer at all) is worth another try."""
    if isinstance(failure, httpx.TransportError):
        return True  # a POST too: its Idempotency-Key makes the retry return the job a lost answer held
    if kind is CallKind.SUBMIT:
        return failure.status in RETRY_STATUSES_SUBMIT or failure.code == KEY_IN_USE
    return failure.status in RETRY_STATUSES_READ
