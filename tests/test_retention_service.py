"""Retention end to end: a real API (whose sweeper deletes) and worker, real HTTP, local disk and S3.

Jobs live DIT_JOB_TTL_S = 3 s here, then answer 410 for DIT_EXPIRED_GRACE_S, then 404.
"""

import json
import re
from pathlib import Path

import boto3
import httpx
import pytest
from redis import Redis

from dit_serve.keys import create_key
from dit_serve.retention import expired_key
from dit_serve.storage import S3Storage, output_key
from tests.conftest import REGION, _wait_until, paused, running_service, wait_for_status

pytestmark = pytest.mark.slow

TTL_S, GRACE_S = 3, 4
EXPIRY_WAIT_S = 20.0  # for the sweep to delete a job due now (it runs every DIT_REAP_INTERVAL_S)
DELETE_WAIT_S = 5.0  # from a job's 410 to its outputs gone
RETENTION_ENV = {
    "DIT_JOB_TTL_S": str(TTL_S),
    "DIT_EXPIRED_GRACE_S": str(GRACE_S),
    "DIT_REAP_INTERVAL_S": "0.5",
}
JOB = {"prompt": "red circle", "n": 2, "num_inference_steps": 2}
S3_BUCKET, S3_PREFIX = "dit-retention", "kept"
LIFECYCLE_BUCKET = "dit-lifecycle"
DEPLOYMENT = Path(__file__).resolve().parents[1] / "docs" / "deployment.md"


def _status(client: httpx.Client, path: str) -> int:
    return client.get(path).status_code


def _assert_error(response: httpx.Response, status: int, code: str) -> None:
    assert response.status_code == status, response.text
    assert response.json()["error"]["code"] == code


def test_an_ended_job_is_deleted_after_its_ttl_then_answers_410_then_404(
    redis_url: str, model_dirs: dict[str, Path], tmp_path: Path
) -> None:
    env = {**RETENTION_ENV, "DIT_AUTH": "on"}
    with running_service(redis_url, tmp_path, {"img": model_dirs["img"]}, env) as svc:
        redis = Redis.from_url(redis_url)
        headers = {
            name: {"Authorization": f"Bearer {create_key(redis, name)[1]}"} for name in ("alice", "bob")
        }
        with (
            httpx.Client(base_url=svc.base_url, timeout=30, headers=headers["alice"]) as alice,
            httpx.Client(base_url=svc.base_url, timeout=30, headers=headers["bob"]) as bob,
        ):
            job = alice.post("/v1/images", json=JOB).json()["id"]
            assert alice.get(f"/v1/jobs/{job}", params={"wait": 60}).json()["status"] == "completed"
            outputs = svc.tmp / "outputs" / "jobs" / job
            assert sorted(path.name for path in outputs.iterdir()) == ["0.png", "1.png"]
            url, output_url = f"/v1/jobs/{job}", f"/v1/jobs/{job}/outputs/0"
            _assert_error(bob.get(url), 404, "job_not_found")

            with paused(svc.workers[0]):  # the next jobs stay queued, or end without running
                timed_out = alice.post("/v1/images", json={**JOB, "queue_timeout_s": 1}).json()["id"]
                canceled = alice.post("/v1/images", json=JOB).json()["id"]
                assert alice.delete(f"/v1/jobs/{canceled}").json()["status"] == "canceled"
                queued = alice.post("/v1/images", json=JOB).json()["id"]
                failed = wait_for_status(alice, timed_out, {"failed"}, timeout_s=15)
                assert failed["error"]["code"] == "queue_timeout"

                _wait_until(lambda: _status(alice, url) == 410, EXPIRY_WAIT_S, "the job to expire")
                _assert_error(alice.get(url), 410, "job_expired")
                _assert_error(alice.get(output_url), 410, "job_expired")
                _assert_error(alice.delete(url), 410, "job_expired")
                # the records go first (clients are told at once), the outputs right after
                _wait_until(lambda: not outputs.exists(), DELETE_WAIT_S, "the outputs to be deleted")
                assert redis.keys(f"*{job}*") == [expired_key(job).encode()]  # nothing else is left
                assert job not in [listed["id"] for listed in alice.get("/v1/jobs").json()["data"]]
                for response in (bob.get(url), bob.get(output_url), bob.delete(url)):
                    _assert_error(response, 404, "job_not_found")  # as for an unknown job

                for ended in (canceled, timed_out):  # jobs that never ran expire too
                    path = f"/v1/jobs/{ended}"
                    _wait_until(lambda path=path: _status(alice, path) == 410, EXPIRY_WAIT_S, "expiry")
                # queued for longer than the TTL, and never swept
                assert alice.get(f"/v1/jobs/{queued}").json()["status"] == "queued"
            assert alice.get(f"/v1/jobs/{queued}", params={"wait": 60}).json()["status"] == "completed"

            _wait_until(lambda: _status(alice, url) == 404, GRACE_S + EXPIRY_WAIT_S, "the grace to end")
            _assert_error(alice.get(url), 404, "job_not_found")
            _assert_error(bob.get(url), 404, "job_not_found")


def test_outputs_in_s3_are_deleted_with_their_job(
    redis_url: str, model_dirs: dict[str, Path], moto_endpoint: str, tmp_path: Path
) -> None:
    s3 = boto3.client("s3", endpoint_url=moto_endpoint, region_name=REGION)
    s3.create_bucket(Bucket=S3_BUCKET)
    env = {
        **RETENTION_ENV,
        "DIT_STORAGE": "s3",
        "DIT_S3_BUCKET": S3_BUCKET,
        "DIT_S3_PREFIX": S3_PREFIX,
        "DIT_S3_ENDPOINT_URL": moto_endpoint,
        "DIT_S3_REGION": REGION,
    }
    with running_service(redis_url, tmp_path, {"img": model_dirs["img"]}, env) as svc, svc.client() as client:
        job = client.post("/v1/images", json=JOB).json()["id"]
        assert client.get(f"/v1/jobs/{job}", params={"wait": 60}).json()["status"] == "completed"

        def stored() -> list[str]:
            listed = s3.list_objects_v2(Bucket=S3_BUCKET, Prefix=f"{S3_PREFIX}/jobs/{job}/")
            return [item["Key"] for item in listed.get("Contents", [])]

        assert stored() == [f"{S3_PREFIX}/jobs/{job}/0.png", f"{S3_PREFIX}/jobs/{job}/1.png"]
        url = f"/v1/jobs/{job}"
        _wait_until(lambda: _status(client, url) == 410, EXPIRY_WAIT_S, "the job to expire")
        _wait_until(lambda: stored() == [], DELETE_WAIT_S, "the objects to be deleted")
        _assert_error(client.get(f"{url}/outputs/1"), 410, "job_expired")
        _wait_until(lambda: _status(client, url) == 404, GRACE_S + EXPIRY_WAIT_S, "the grace to end")


def test_the_documented_lifecycle_rule_is_accepted_by_s3(moto_endpoint: str) -> None:
    section = DEPLOYMENT.read_text().split("## Retention with an S3 lifecycle rule", 1)[1]
    rule = json.loads(re.search(r"^```json\n(.*?)^```", section, re.MULTILINE | re.DOTALL).group(1))  # type: ignore[union-attr]
    s3 = boto3.client("s3", endpoint_url=moto_endpoint, region_name=REGION)
    s3.create_bucket(Bucket=LIFECYCLE_BUCKET)
    s3.put_bucket_lifecycle_configuration(Bucket=LIFECYCLE_BUCKET, LifecycleConfiguration=rule)
    [applied] = s3.get_bucket_lifecycle_configuration(Bucket=LIFECYCLE_BUCKET)["Rules"]
    assert applied["Filter"] == {"Prefix": "dit/jobs/"} and applied["Expiration"] == {"Days": 7}
    # ... the prefix the service writes under with DIT_S3_PREFIX=dit
    assert (
        S3Storage(LIFECYCLE_BUCKET, prefix="dit")
        .object_key(output_key("j", 0, "png"))
        .startswith("dit/jobs/")
    )
