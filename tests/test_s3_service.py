"""The whole service with the S3 backend, against a real S3 endpoint (moto's server) over HTTP."""

from collections.abc import Iterator
from pathlib import Path

import boto3
import pytest

from tests.conftest import BUCKET, REGION, Service, running_service, wait_for_status

pytestmark = pytest.mark.slow
PREFIX = "e2e"


@pytest.fixture
def s3_service(
    redis_url: str, model_dirs: dict[str, Path], moto_endpoint: str, tmp_path: Path
) -> Iterator[Service]:
    s3 = {
        "DIT_STORAGE": "s3",
        "DIT_S3_BUCKET": BUCKET,
        "DIT_S3_PREFIX": PREFIX,
        "DIT_S3_ENDPOINT_URL": moto_endpoint,
    }
    env = {**s3, "DIT_S3_REGION": REGION}
    with running_service(redis_url, tmp_path, {"img": model_dirs["img"]}, env) as svc:
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
        stored = s3.get_object(Bucket=BUCKET, Key=f"{PREFIX}/jobs/{job['id']}/{index}.png")
        assert stored["ContentType"] == "image/png"
        assert stored["Body"].read() == response.content
        assert response.headers["content-type"] == "image/png"
    assert not (s3_service.tmp / "outputs").exists()  # nothing written to local disk
