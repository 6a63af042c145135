"""Schemathesis against a real API with auth on: /openapi.json tells the truth about every answer.

The API runs as its own process with a valid key sent on every request, and class-conditional image
and text-to-video models registered but no worker, so jobs are accepted and stay queued. Schemathesis
runs every phase with all its checks, from a fixed seed: no answer may be a 5xx, use an undocumented
status, content type or header, or break its documented schema.
"""

import json
import os
import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from redis import Redis

from dit_serve.catalog import publish_worker
from dit_serve.contract import ConditioningKind, JobKind, ModelDefaults, ModelSpec
from dit_serve.keys import create_key
from dit_serve.lora_registry import publish_targets
from tests.conftest import api_without_workers
from tests.schemathesis_hooks import API_ENV, KEY_ENV
from tests.test_contract import SPEC

pytestmark = pytest.mark.slow

SEED = 20261130
MAX_EXAMPLES = 30  # per operation and phase
MIN_CASES = 500  # the floor for one run
RUN_TIMEOUT_S = 300
# Small, so that some submissions meet a full queue: 429 queue_full and its Retry-After are checked too.
QUEUE_DEPTH = 3
OPENAI_WAIT_S = 0.1  # POST /v1/images/generations waits this long for a job that never runs here
VIDEO_SPEC = ModelSpec(
    name="fuzz-video",
    kind=JobKind.VIDEO,
    family="wan",
    conditioning=ConditioningKind.TEXT,
    sizes=["32x32"],
    default_size="32x32",
    size_multiple=16,
    max_pixels=64 * 64,
    defaults=ModelDefaults(num_inference_steps=7, guidance_scale=5.0, num_frames=5),
    max_frames=9,
    frames_multiple=4,
)
CASES = re.compile(r"(\d+) generated.*")  # the summary's count of test cases
HOOKS = Path(__file__).with_name("schemathesis_hooks.py")
ACCEPTED = ["2xx", "3xx", "401", "403", "404", "409", "429", "5xx"]  # positive_data_acceptance's default
# Every check on (as the CLI's `--checks all`, which would also override the exceptions), and three
# exceptions, each one check on one operation, for a fact that no schema can hold.
CONFIG = f"""
[checks]
enabled = true

# Warnings that would mean the run did not test what it claims: the key was refused, the schema's
# validation differs from the API's, the schema cannot be read whole. Not `missing_test_data`: with no
# worker no job has outputs, so GET /v1/jobs/{{job_id}}/outputs/{{index}} can only answer 404.
[warnings]
fail-on = [
    "missing_auth", "unused_openapi_auth", "validation_mismatch", "base_url_mismatch",
    "unsupported_regex", "unresolvable_reference", "missing_deserializer", "method_not_allowed",
]

# Which models, label names, class ids, sizes and frame counts a request may use depends on the models
# live workers serve (GET /v1/models): a schema-valid request for something else is rightly a 422.
# On OpenAI's routes (POST /v1/images/generations, multipart POST /v1/videos) that is a 400.
[[operations]]
include-method = "POST"
include-path-regex = "^/v1/(images|videos|images/generations)$"
checks.positive_data_acceptance.expected-statuses = {ACCEPTED + ["400", "422"]}

# POST /v1/loras: a schema-valid body names a model and a path on the server; any other is a 422.
[[operations]]
include-method = "POST"
include-path = "/v1/loras"
checks.positive_data_acceptance.expected-statuses = {ACCEPTED + ["422"]}
# `after` must name a job of this very listing: a schema-valid string that names none is a 422.
[[operations]]
include-method = "GET"
include-path = "/v1/jobs"
checks.positive_data_acceptance.expected-statuses = {ACCEPTED + ["422"]}

# The same for GET /v1/videos, in OpenAI's status.
[[operations]]
include-method = "GET"
include-path = "/v1/videos"
checks.positive_data_acceptance.expected-statuses = {ACCEPTED + ["400"]}

# No worker runs, so an accepted image generation never ends: its answer is the documented 504
# generation_timeout (after DIT_OPENAI_WAIT_S, short here), which names the job to poll. It never
# answers a 2xx here, which schemathesis would read as a validation mismatch: that warning is left
# out for this one operation (the hooks make its generated requests ones the models take).
[[operations]]
include-method = "POST"
include-path = "/v1/images/generations"
checks.not_a_server_error.expected-statuses = ["2xx", "3xx", "4xx", "504"]
warnings = [
    "missing_auth", "unused_openapi_auth", "base_url_mismatch", "unsupported_regex",
    "unresolvable_reference", "missing_deserializer", "method_not_allowed",
]

# DELETE /v1/jobs/{{job_id}} cancels: the job stays readable, `canceled`, so a GET after it is a 200.
[[operations]]
include-method = "GET"
include-path = "/v1/jobs/{{job_id}}"
checks.use_after_free.enabled = false
"""


def test_schemathesis_finds_no_server_error_and_no_schema_violation(redis_url: str, tmp_path: Path) -> None:
    with api_without_workers(
        redis_url,
        tmp_path,
        SPEC,
        DIT_AUTH="on",
        DIT_MAX_QUEUE_DEPTH=str(QUEUE_DEPTH),
        DIT_WEBHOOK_ALLOW="127.0.0.1",  # the hooks' LOCAL_WEBHOOK_URL: webhook jobs are accepted too
        DIT_OPENAI_WAIT_S=str(OPENAI_WAIT_S),
    ) as svc:
        redis = Redis.from_url(redis_url)
        publish_worker(redis, "registered-video", [VIDEO_SPEC], ttl_s=600)
        for spec in (SPEC, VIDEO_SPEC):  # what their workers would publish: POST /v1/loras reads files
            publish_targets(redis, spec.name, {"blocks.0.attn.to_q": (8, 8)})
        # an admin key: DELETE /v1/loras/{model}/{name} answers only 403 to any other (and then schemathesis
        # rightly warns that it never got past authentication)
        _, secret = create_key(redis, "fuzz", admin=True)
        config, requests = tmp_path / "schemathesis.toml", tmp_path / "requests.ndjson"
        config.write_text(CONFIG)
        run = subprocess.run(
            [
                sys.executable,
                "-m",
                "schemathesis.cli",
                "--config-file",
                str(config),
                "run",
                f"{svc.base_url}/openapi.json",  # the schema names no server: requests go to this one
                "--seed",
                str(SEED),
                "--max-examples",
                str(MAX_EXAMPLES),
                "--header",
                f"Authorization: Bearer {secret}",
                "--generation-database",
                "none",  # nothing replayed from an earlier run: the seed alone decides the cases
                "--suppress-health-check",
                "too_slow",  # Hypothesis' timing of its own generation, which a busy 2-core machine fails
                "--report",
                "ndjson",
                "--report-ndjson-path",
                str(requests),
                "--no-color",
            ],
            cwd=tmp_path,
            env={**os.environ, "SCHEMATHESIS_HOOKS": str(HOOKS), API_ENV: svc.base_url, KEY_ENV: secret},
            capture_output=True,
            text=True,
            timeout=RUN_TIMEOUT_S,
        )
    report = run.stdout + run.stderr
    assert run.returncode == 0, report[-20000:]
    counted = list(CASES.finditer(report))
    assert counted and int(counted[-1][1]) >= MIN_CASES, report[-3000:]
    print("schemathesis:", counted[-1][0])  # shown by `pytest -s`
    sent = {url for line in requests.read_text().splitlines() for url in _uris(json.loads(line))}
    assert sent and all(url.startswith(svc.base_url + "/") for url in sent), sorted(sent)[:5]


def _uris(event: object) -> Iterator[str]:
    """The URL of every request recorded in one event of the NDJSON report (under the key "uri")."""
    if isinstance(event, dict):
        for key, value in event.items():
            if key == "uri" and isinstance(value, str):
                yield value
            else:
                yield from _uris(value)
    elif isinstance(event, list):
        for value in event:
            yield from _uris(value)
