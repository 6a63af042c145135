"""Schemathesis hooks for tests/test_openapi_fuzz.py, loaded by its `st` process (SCHEMATHESIS_HOOKS)."""

import os
from typing import Any
from urllib.parse import quote, urljoin

import httpx
import schemathesis

from app.routes.jobs import MAX_WAIT_S

WAIT_CAP_S = 0.2
JOB = ("GET", "/v1/jobs/{job_id}")
EVENTS = ("GET", "/v1/jobs/{job_id}/events")
# Where the fuzz test's API listens and the key it accepts (set by tests/test_openapi_fuzz.py).
API_ENV, KEY_ENV = "DIT_FUZZ_API", "DIT_FUZZ_KEY"
# The API resolves a webhook_url's host name when it accepts it: a generated URL must not make it look
# up an arbitrary name. This one is an IP literal, allow-listed by the fuzz test, and nothing listens.
LOCAL_WEBHOOK_URL = "http://127.0.0.1:9/hook"
IMAGE_GENERATIONS, MULTIPART = "/v1/images/generations", "multipart/form-data"
OPENAI_SUBMISSIONS = {IMAGE_GENERATIONS, "/v1/videos"}
# Fields whose valid values depend on the registered models (tests/test_contract.py's SPEC, and the
# fuzz test's VIDEO_SPEC): left to the models' defaults, and the image prompt made one of SPEC's labels.
MODEL_FIELDS = ("model", "size", "seconds", "num_frames", "fps", "class_labels")
LABEL = "red circle"
OPENAI_ACCEPTED = {200, 504}  # a video created; an image job that did not end in time (our JSON: 202)


@schemathesis.hook
def before_call(_context: Any, case: Any, _kwargs: dict[str, Any]) -> None:
    """Shorten a valid `wait` of GET /v1/jobs/{job_id} to WAIT_CAP_S, in every phase, and point every
    string `webhook_url` at LOCAL_WEBHOOK_URL.

    No worker runs in the fuzz test, so a job stays queued and a wait on it holds the request for the
    whole wait (up to a minute). Invalid values are left alone, for the API to refuse.
    """
    if isinstance(case.body, dict) and isinstance(case.body.get("webhook_url"), str):
        case.body["webhook_url"] = LOCAL_WEBHOOK_URL
    if case.operation.method.upper() == "POST" and (
        case.operation.path == IMAGE_GENERATIONS or case.media_type == MULTIPART
    ):
        _pin_model_fields(case.body, image=case.operation.path == IMAGE_GENERATIONS)
    if (case.operation.method.upper(), case.operation.path) == EVENTS:
        _cancel_first(case)
    if (case.operation.method.upper(), case.operation.path) != JOB or not case.query:
        return
    wait = case.query.get("wait")
    if WAIT_CAP_S < _seconds(wait) <= MAX_WAIT_S:
        case.query["wait"] = str(WAIT_CAP_S) if isinstance(wait, str) else WAIT_CAP_S


def _cancel_first(case: Any) -> None:
    """Cancel the job whose event stream is asked for, so that the stream ends at once with its
    `canceled` event: with no worker a queued job's stream would last until the client gave up."""
    job_id = (case.path_parameters or {}).get("job_id")
    if isinstance(job_id, str) and job_id:
        url = f"{os.environ[API_ENV]}/v1/jobs/{quote(job_id, safe='')}"
        httpx.delete(url, headers={"Authorization": f"Bearer {os.environ[KEY_ENV]}"}, timeout=10)


def _seconds(value: object) -> float:
    """A query value as the API reads a number (the coverage phase sends strings); NaN if it is none."""
    if isinstance(value, bool | int | float | str) and not isinstance(value, bool):
        try:
            return float(value)
        except ValueError:
            pass
    return float("nan")


@schemathesis.hook
def after_call(_context: Any, case: Any, response: Any) -> None:
    """Cancel the job an OpenAI-compatible submission queued, as a client that gave up would.

    No worker runs, so the job would hold one of its model's few queue places for the rest of the run
    (our JSON submissions get theirs back from the stateful phase's DELETE /v1/jobs/{id}), and every
    later submission would meet a full queue. Both answers name the job in `Location`.
    """
    if case.operation.method.upper() != "POST" or case.operation.path not in OPENAI_SUBMISSIONS:
        return
    location = response.headers.get("location")
    if response.status_code not in OPENAI_ACCEPTED or not location:
        return
    url = urljoin(response.request.url, location[0] if isinstance(location, list) else location)
    auth = {"Authorization": response.request.headers["Authorization"]}
    httpx.delete(url, headers=auth, timeout=10)


def _pin_model_fields(body: object, image: bool) -> None:
    """Give an OpenAI-compatible submission values the registered models take, so that schemathesis
    sees some accepted. OpenAI's bodies have no `oneOf` that ties a prompt to a model's labels, nor a
    `seconds` to its frames, so nearly every generated one is refused otherwise; those refusals are
    tested with the openai SDK itself (tests/test_openai_compat.py). Other fields stay as generated."""
    if not isinstance(body, dict):
        return
    for name in MODEL_FIELDS:
        body.pop(name, None)
    if image:  # SPEC is class-conditional: a label, no negative prompt; and streaming is not built yet
        body["prompt"] = LABEL
        body.pop("negative_prompt", None)
        body.pop("stream", None)
