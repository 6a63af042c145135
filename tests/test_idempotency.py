"""Idempotency-Key: one job per caller, key and body; replays, conflicts, and a race of 10 POSTs."""

from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest
from redis import Redis
from rq import Queue

from dit_serve.idempotency import IDEMPOTENCY_TTL_S, ClaimOutcome, claim, claim_key
from dit_serve.jobs import queue_name
from tests.conftest import Service, api_without_workers
from tests.test_contract import SPEC

BODY = {"prompt": "red circle", "seed": 5}
RACERS = 10


def test_a_key_is_claimed_once_then_replayed_or_refused(redis: Redis) -> None:
    first = claim(redis, "", "k1", "fingerprint-a", "job-1")
    again = claim(redis, "", "k1", "fingerprint-a", "job-2")
    other = claim(redis, "", "k1", "fingerprint-b", "job-3")
    elsewhere = claim(redis, "another-caller", "k1", "fingerprint-a", "job-4")
    assert (first.outcome, first.job_id) == (ClaimOutcome.NEW, "job-1")
    assert (again.outcome, again.job_id) == (ClaimOutcome.REPLAY, "job-1")
    assert (other.outcome, other.job_id) == (ClaimOutcome.CONFLICT, "job-1")
    assert (elsewhere.outcome, elsewhere.job_id) == (ClaimOutcome.NEW, "job-4")  # keys are per caller
    assert IDEMPOTENCY_TTL_S - 5 < redis.ttl(claim_key("", "k1")) <= IDEMPOTENCY_TTL_S


@pytest.fixture
def api_only(redis_url: str, tmp_path: Path) -> Iterator[Service]:
    with api_without_workers(redis_url, tmp_path, SPEC) as svc:
        yield svc


def _post(svc: Service, key: str | None, body: dict) -> httpx.Response:
    headers = {"Idempotency-Key": key} if key is not None else {}
    return httpx.post(f"{svc.base_url}/v1/images", json=body, headers=headers, timeout=30)


def _queued(svc: Service) -> list[str]:
    return Queue(queue_name(SPEC.name), connection=Redis.from_url(svc.redis_url)).get_job_ids()


@pytest.mark.slow
def test_replay_conflict_and_a_race_of_identical_posts(api_only: Service) -> None:
    first = _post(api_only, "order-1", BODY)
    replay = _post(api_only, "order-1", BODY)
    assert first.status_code == replay.status_code == 202
    assert replay.json()["id"] == first.json()["id"] and replay.headers["Idempotent-Replayed"] == "true"
    assert replay.headers["Location"] == f"/v1/jobs/{first.json()['id']}"
    assert _queued(api_only) == [first.json()["id"]]  # nothing new queued

    conflict = _post(api_only, "order-1", {**BODY, "seed": 6})
    assert conflict.status_code == 409 and conflict.json()["error"]["code"] == "idempotency_key_reused"
    for bad in ("", "x" * 256, "has space", "tab\there"):
        refused = _post(api_only, bad, BODY)
        assert refused.status_code == 422, bad
        assert refused.json()["error"]["code"] == "invalid_idempotency_key"
    assert len(_queued(api_only)) == 1  # refusals change nothing

    with ThreadPoolExecutor(RACERS) as pool:
        racers = list(pool.map(lambda _: _post(api_only, "order-2", BODY), range(RACERS)))
    assert {response.status_code for response in racers} == {202}
    assert len({response.json()["id"] for response in racers}) == 1  # exactly one job
    assert len(_queued(api_only)) == 2
    assert _post(api_only, None, BODY).json()["id"] not in {first.json()["id"], racers[0].json()["id"]}
