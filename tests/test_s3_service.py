"""The whole service with the S3 backend, against a real S3 endpoint (moto's server) over HTTP."""

from collections.abc import Iterator
from pathlib import Path

import boto3
import pytest

from dit_serve.jobs import STORAGE_FAILED_ERROR
from tests.conftest import REGION, Service, running_service, wait_for_status

pytestmark = pytest.mark.slow
PREFIX = "e2e"
SERVICE_BUCKET = "dit-outputs-service"  # this module's own: a test deletes it


@pytest.fixture(scope="module")
def s3_service(
    redis_url: str, model_dirs: dict[str, Path], moto_endpoint: str, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Service]:
    boto3.client("s3", endpoint_url=moto_endpoint, region_name=REGION).create_bucket(Bucket=SERVICE_BUCKET)
    s3 = {
        "DIT_STORAGE": "s3",
        "DIT_S3_BUCKET": SERVICE_BUCKET,
        "DIT_S3_PREFIX": PREFIX,
        "DIT_S3_ENDPOINT_URL": moto_endpoint,
    }
    env = {**s3, "DIT_S3_REGION": REGION}
    with running_service(redis_url, tmp_path_factory.mktemp("s3"), {"img": model_dirs["img"]}, env) as svc:
        yield svc


def test_outputs_go_to_s3_and_come_back_through_the_api(s3_service: Service, moto_endpoint: str) -> None:
    with s3_service.client() as client:
        job = client.post(
            "/v1/images", json={"prompt": "cyan diamond", "n": 2, "num_inference_steps": 3}
        ).json()
        done = wait_for_status(client, job["id"], {"completed", "failed"})
        assert done["status"] == "completed", done
        served = [client.get(output["url"]) for output in done["outputs"]]
    s3 = boto3.client("s3", endpoint_url=moto_endpoint, region_name=REGION)
    for index, response in enumerate(served):
        stored = s3.get_object(Bucket=SERVICE_BUCKET, Key=f"{PREFIX}/jobs/{job['id']}/{index}.png")
        assert stored["ContentType"] == "image/png"
        assert stored["Body"].read() == response.content
        assert response.headers["content-type"] == "image/png"
    assert not (s3_service.tmp / "outputs").exists()  # nothing written to local disk


def _delete_bucket(s3, bucket: str) -> None:  # type: ignore[no-untyped-def]
    for page in s3.get_paginator("list_objects_v2").paginate(Bucket=bucket):
        for item in page.get("Contents", []):
            s3.delete_object(Bucket=bucket, Key=item["Key"])
    s3.delete_bucket(Bucket=bucket)


def test_a_bucket_gone_under_the_service_fails_jobs_and_reads_clearly(
    s3_service: Service, moto_endpoint: str
) -> None:
    """S3 failing for another reason than a missing key: the bucket is deleted while the service runs."""
    s3 = boto3.client("s3", endpoint_url=moto_endpoint, region_name=REGION)
    quick = {"prompt": "red circle", "num_inference_steps": 2}
    with s3_service.client() as client:
        before = wait_for_status(client, client.post("/v1/images", json=quick).json()["id"], {"completed"})
        _delete_bucket(s3, SERVICE_BUCKET)
        try:
            # the worker cannot store: the job fails with what to do; the cause goes to the worker's log
            job = client.post("/v1/images", json=quick).json()
            failed = client.get(f"/v1/jobs/{job['id']}", params={"wait": 60}).json()
            assert failed["status"] == "failed" and failed["outputs"] == [], failed
            assert failed["error"] == STORAGE_FAILED_ERROR.model_dump()
            assert "NoSuchBucket" not in failed["error"]["message"]
            assert f"storing outputs of job {job['id']} failed" in s3_service.worker_log()
            assert "NoSuchBucket" in s3_service.worker_log()
            # the API cannot read an output it has a record of: a 5xx in the error shape, not a 404,
            # with a request id and no exception text; the cause is in the API's log under that id
            response = client.get(before["outputs"][0]["url"])
            assert response.status_code == 500, response.text
            error = response.json()["error"]
            assert set(response.json()) == {"error"} and error["code"] == "internal_error"
            assert "NoSuchBucket" not in error["message"] and SERVICE_BUCKET not in error["message"]
            assert error["request_id"] == response.headers["x-request-id"]
            assert f"(request {error['request_id']})" in s3_service.api_log()
            assert "NoSuchBucket" in s3_service.api_log()
        finally:
            s3.create_bucket(Bucket=SERVICE_BUCKET)
        # both processes serve on once the bucket is back
        again = client.post("/v1/images", json=quick).json()
        assert client.get(f"/v1/jobs/{again['id']}", params={"wait": 60}).json()["status"] == "completed"
        assert client.get("/readyz").status_code == 200
