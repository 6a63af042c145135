"""Schemathesis hooks for tests/test_openapi_fuzz.py, loaded by its `st` process (SCHEMATHESIS_HOOKS)."""

from typing import Any

import schemathesis

from app.routes.jobs import MAX_WAIT_S

WAIT_CAP_S = 0.2
JOB = ("GET", "/v1/jobs/{job_id}")
# The API resolves a webhook_url's host name when it accepts it: a generated URL must not make it look
# up an arbitrary name. This one is an IP literal, allow-listed by the fuzz test, and nothing listens.
LOCAL_WEBHOOK_URL = "http://127.0.0.1:9/hook"


@schemathesis.hook
def before_call(_context: Any, case: Any, _kwargs: dict[str, Any]) -> None:
    """Shorten a valid `wait` of GET /v1/jobs/{job_id} to WAIT_CAP_S, in every phase, and point every
    string `webhook_url` at LOCAL_WEBHOOK_URL.

    No worker runs in the fuzz test, so a job stays queued and a wait on it holds the request for the
    whole wait (up to a minute). Invalid values are left alone, for the API to refuse.
    """
    if isinstance(case.body, dict) and isinstance(case.body.get("webhook_url"), str):
        case.body["webhook_url"] = LOCAL_WEBHOOK_URL
    if (case.operation.method.upper(), case.operation.path) != JOB or not case.query:
        return
    wait = case.query.get("wait")
    if WAIT_CAP_S < _seconds(wait) <= MAX_WAIT_S:
        case.query["wait"] = str(WAIT_CAP_S) if isinstance(wait, str) else WAIT_CAP_S


def _seconds(value: object) -> float:
    """A query value as the API reads a number (the coverage phase sends strings); NaN if it is none."""
    if isinstance(value, bool | int | float | str) and not isinstance(value, bool):
        try:
            return float(value)
        except ValueError:
            pass
    return float("nan")
