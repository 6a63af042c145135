"""The typed job contract: one place to add a field, versioned records, and models' own defaults."""

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from redis import Redis
from rq import Queue

from dit_serve.catalog import publish_worker
from dit_serve.contract import (
    SCHEMA_VERSION,
    ConditioningKind,
    JobKind,
    JobRequest,
    JobSchemaError,
    JobTooNewError,
    ModelDefaults,
    ModelSpec,
    OutputFormat,
    Priority,
)
from dit_serve.jobs import JobRecord, OutputRecord, RecordField, queue_name, record_key
from dit_serve.queueing import enqueue_job
from worker.queue import JobQueue

ROOT = Path(__file__).resolve().parents[1]
MODEL = "m"
QUEUE = queue_name(MODEL)
TTL_S = 3600
SPEC = ModelSpec(
    name=MODEL,
    kind=JobKind.IMAGE,
    family="dit",
    conditioning=ConditioningKind.CLASS,
    sizes=["32x32"],
    default_size="32x32",
    defaults=ModelDefaults(num_inference_steps=7, guidance_scale=3.5),
    labels=["red circle", "blue square"],
    num_classes=2,
)


def _request(**changes: object) -> JobRequest:
    fields: dict[str, object] = dict(
        kind=JobKind.IMAGE,
        model=MODEL,
        n=1,
        seed=3,
        class_labels=[1],
        guidance_scale=4.0,
        num_inference_steps=5,
        width=32,
        height=32,
        output_format=OutputFormat.PNG,
    )
    return JobRequest(**(fields | changes))  # type: ignore[arg-type]


def test_a_record_round_trips_through_its_redis_hash(redis: Redis) -> None:
    record = JobRecord.new(_request(n=2, class_labels=[0, 1]))
    redis.hset(record_key("j"), mapping=record.creation_fields())  # type: ignore[arg-type]
    output = OutputRecord(index=0, content_type="image/png", width=32, height=32, seed=3, bytes=5, key="k")
    redis.hset(record_key("j"), mapping={RecordField.OUTPUTS: json.dumps([output.model_dump()])})
    read = JobRecord.from_hash(redis.hgetall(record_key("j")))  # type: ignore[arg-type]
    assert (
        read.request == record.request and read.outputs == [output] and read.created_at == record.created_at
    )
    assert read.request.compat == "m|image|32x32|5|1"


def test_a_request_that_breaks_the_contract_is_refused() -> None:
    with pytest.raises(ValueError, match="class_labels has 2 ids"):
        _request(class_labels=[0, 1])
    with pytest.raises(ValueError, match="not a image format"):
        _request(output_format=OutputFormat.MP4)
    with pytest.raises(ValueError, match="class_labels .* or a negative_prompt"):
        _request(class_labels=None, prompt="a cat")


def test_a_newer_schema_is_refused_with_advice_not_misread() -> None:
    newer = json.loads(_request().to_json()) | {"schema_version": SCHEMA_VERSION + 1, "brand_new": 1}
    with pytest.raises(JobTooNewError, match=f"v{SCHEMA_VERSION + 1}.*upgrade"):
        JobRequest.from_json(json.dumps(newer))
    with pytest.raises(JobSchemaError, match="does not fit"):
        JobRequest.from_json(json.dumps(json.loads(_request().to_json()) | {"brand_new": 1}))


def test_an_older_worker_leaves_a_newer_job_queued_and_takes_the_rest(
    redis: Redis, caplog: pytest.LogCaptureFixture
) -> None:
    enqueue_job(redis, "new", JobRecord.new(_request()), retries=0, ttl_s=TTL_S)
    redis.hset(record_key("new"), RecordField.SCHEMA_VERSION, SCHEMA_VERSION + 1)
    enqueue_job(redis, "old", JobRecord.new(_request()), retries=0, ttl_s=TTL_S)
    queue = JobQueue(redis, [QUEUE], "w1", 30, TTL_S)
    with caplog.at_level("WARNING"):
        taken = queue.take(QUEUE, 16, "e1")
    assert [ticket.job_id for ticket in taken] == ["old"]
    assert Queue(QUEUE, connection=redis).get_job_ids() == ["new"]  # still queued, for a newer worker
    assert f"job schema v{SCHEMA_VERSION + 1}" in caplog.text and "upgrade" in caplog.text


def test_a_job_whose_request_is_unreadable_fails_with_invalid_job(redis: Redis) -> None:
    enqueue_job(redis, "bad", JobRecord.new(_request()), retries=0, ttl_s=TTL_S)
    redis.hset(record_key("bad"), RecordField.REQUEST, '{"kind": "image"}')
    assert JobQueue(redis, [QUEUE], "w1", 30, TTL_S).take(QUEUE, 16, "e1") == []
    assert redis.hget("rq:job:bad", "status") == b"failed"
    assert json.loads(redis.hget(record_key("bad"), RecordField.ERROR) or b"{}")["code"] == "invalid_job"


def test_request_docs_point_at_each_models_defaults_not_one_familys() -> None:
    from app.main import create_app
    from dit_serve.config import Settings

    schema = json.dumps(create_app(Settings(redis_url="redis://127.0.0.1:1/0")).openapi())
    assert "default 25" not in schema and "default 4.0" not in schema
    assert schema.count("the model's `defaults`") >= 3  # steps, guidance, frames


INJECT_AFTER = "class ClientOptions(BaseModel):"
DUMMY_FIELD = '    dummy_field: str = "unset"\n'

# Runs in a copy of the code with one line added to the contract: the API accepts the new field,
# stores it, and the worker's queue hands it over, typed, with nothing else changed on the way.
DUMMY_SCRIPT = """
import sys, json
from fastapi.testclient import TestClient
from redis import Redis
from app.main import create_app
from dit_serve.catalog import publish_worker
from dit_serve.config import Settings
from dit_serve.contract import ModelSpec
from worker.queue import JobQueue
redis_url, spec, out_dir = sys.argv[1], ModelSpec.model_validate_json(sys.argv[2]), sys.argv[3]
redis = Redis.from_url(redis_url)
publish_worker(redis, "w", [spec], 60)
with TestClient(create_app(Settings(redis_url=redis_url, output_dir=out_dir, auth="off"))) as client:
    body = {"prompt": "red circle", "dummy_field": "hello"}
    response = client.post("/v1/images", json=body)
    assert response.status_code == 202, response.text
    assert response.json()["request"]["dummy_field"] == "hello"
[ticket] = JobQueue(redis, ["dit-serve." + spec.name], "w", 30, 3600).take("dit-serve." + spec.name, 16, "e")
print(json.dumps({"read_by_worker": ticket.request.dummy_field}))
"""


@pytest.mark.slow
def test_a_field_added_in_one_place_reaches_the_worker(redis_url: str, tmp_path: Path) -> None:
    """Add one line to ClientOptions in a copy of the code: POST it, and the worker reads it typed."""
    Redis.from_url(redis_url).flushdb()
    code = tmp_path / "code"
    for package in ("app", "dit_serve", "worker", "models"):
        shutil.copytree(
            ROOT / package, code / package, ignore=shutil.ignore_patterns("bundled", "__pycache__")
        )
    contract = code / "dit_serve" / "contract.py"
    source = contract.read_text()
    head, sep, tail = source.partition(INJECT_AFTER)
    docstring_end = tail.index('"""', tail.index('"""') + 3) + 3  # after the class docstring
    contract.write_text(
        head + sep + tail[:docstring_end] + "\n" + DUMMY_FIELD.rstrip() + tail[docstring_end:]
    )
    changed = subprocess.run(
        ["diff", "-r", str(ROOT / "dit_serve"), str(code / "dit_serve"), "-x", "__pycache__"],
        capture_output=True,
        text=True,
    ).stdout
    assert [line for line in changed.splitlines() if line.startswith((">", "<"))] == [
        "> " + DUMMY_FIELD.rstrip()
    ]
    command = [sys.executable, "-c", DUMMY_SCRIPT, redis_url, SPEC.model_dump_json(), str(tmp_path / "out")]
    result = subprocess.run(command, cwd=code, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-3000:]
    assert json.loads(result.stdout.splitlines()[-1]) == {"read_by_worker": "hello"}
    # The same request against the unchanged code is refused: the field really is new.
    Redis.from_url(redis_url).flushdb()
    publish_worker(Redis.from_url(redis_url), "w", [SPEC], 60)
    unchanged = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert unchanged.returncode != 0 and "dummy_field: Extra inputs are not permitted" in unchanged.stderr
    Redis.from_url(redis_url).flushdb()


def test_the_worker_reads_no_request_by_string_key() -> None:
    """Requests reach worker code as JobRequest objects: no `request["..."]` or `.get("...")` reads."""
    offenders = [
        f"{path.name}:{number}"
        for path in sorted((ROOT / "worker").glob("*.py"))
        for number, line in enumerate(path.read_text().splitlines(), 1)
        if "request[" in line or "request.get(" in line
    ]
    assert offenders == []


def test_the_api_answers_503_for_a_job_of_a_newer_schema(
    redis: Redis, redis_url: str, tmp_path: Path
) -> None:
    """Mid rolling upgrade an older API replica says why it cannot show a newer job, not a 500."""
    from fastapi.testclient import TestClient

    from app.main import create_app
    from dit_serve.config import Settings

    enqueue_job(redis, "new", JobRecord.new(_request()), retries=0, ttl_s=TTL_S)
    redis.hset(record_key("new"), RecordField.SCHEMA_VERSION, SCHEMA_VERSION + 1)
    with TestClient(create_app(Settings(redis_url=redis_url, output_dir=tmp_path, auth="off"))) as client:
        response = client.get("/v1/jobs/new")
    assert response.status_code == 503
    assert response.json()["error"]["code"] == "job_schema_too_new"
    assert "upgrade" in response.json()["error"]["message"]


def test_a_job_written_at_schema_1_is_read_by_this_worker_with_the_new_fields_defaulted() -> None:
    stored = json.loads(_request().to_json())
    for field in ("priority", "webhook_url", "webhook_events"):
        stored.pop(field, None)
    read = JobRequest.from_json(json.dumps(stored | {"schema_version": 1}))
    assert read.schema_version == 1 and read.priority is Priority.NORMAL and read.webhook_url is None
