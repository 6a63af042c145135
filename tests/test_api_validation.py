"""Bad input: each case is a 4xx in the documented error shape, and nothing is queued.

Faults past the input (an output gone from storage, a job record the API cannot read) get the
same shape, and the API serves on.
"""

import json
import re
from collections.abc import Iterator

import pytest
from redis import Redis

from dit_serve.config import Settings
from dit_serve.jobs import RecordField, record_key
from tests.conftest import Service, metric, scrape, wait_for_status

VALID = {"prompt": "red circle"}
MAX_BODY_BYTES = Settings.model_fields["max_body_bytes"].default
BAD_IMAGE_BODIES = {
    "missing prompt and labels": ({}, 422),
    "both prompt and labels": ({"prompt": "red circle", "class_labels": [1]}, 422),
    "empty prompt": ({"prompt": ""}, 422),
    "40 kB prompt": ({"prompt": "x" * 40_000}, 422),
    "100 kB body": ({"prompt": "x" * 100_000}, 413),
    "n=0": ({**VALID, "n": 0}, 422),
    "n=1000": ({**VALID, "n": 1000}, 422),
    "size 99999x99999": ({**VALID, "size": "99999x99999"}, 422),
    "size abc": ({**VALID, "size": "abc"}, 422),
    "steps 0": ({**VALID, "num_inference_steps": 0}, 422),
    "steps 10000": ({**VALID, "num_inference_steps": 10000}, 422),
    "guidance -1": ({**VALID, "guidance_scale": -1}, 422),
    "unknown model": ({**VALID, "model": "no-such-model"}, 422),
    "unknown field": ({**VALID, "colour": "red"}, 422),
    "prompt naming no label": ({"prompt": "purple elephant"}, 422),
    "class label out of range": ({"class_labels": [5000]}, 422),
    "negative seed": ({**VALID, "seed": -1}, 422),
    "seed above 2^63-1": ({**VALID, "seed": 2**63}, 422),
    "bad output format": ({**VALID, "output_format": "bmp"}, 422),
    "video model for an image": ({**VALID, "model": "vid"}, 422),
    "class_labels length not 1 or n": ({"class_labels": [1, 2], "n": 3}, 422),
    "webhook_events without webhook_url": ({**VALID, "webhook_events": ["completed"]}, 422),
    "unknown webhook event": (
        {**VALID, "webhook_url": "https://x.example/", "webhook_events": ["output"]},
        422,
    ),
    "webhook_url of 3000 characters": ({**VALID, "webhook_url": "https://x.example/" + "a" * 3000}, 422),
}
BAD_VIDEO_BODIES = {
    "too many frames": ({"prompt": "red circle moving left", "num_frames": 17}, 422),
    "n=2 for a video": ({"prompt": "red circle moving left", "n": 2}, 422),
    "fps 0": ({"prompt": "red circle moving left", "fps": 0}, 422),
    "png is not a video format": ({"prompt": "red circle moving left", "output_format": "png"}, 422),
}


def _queued_state(service: Service) -> tuple[int, int]:
    redis = Redis.from_url(service.redis_url)
    jobs = len(list(redis.scan_iter("dit:job:*"))) + len(list(redis.scan_iter("rq:job:*")))
    queued = sum(redis.llen(key) for key in redis.scan_iter("rq:queue:*"))
    return jobs, queued


def _assert_error_shape(response, status: int) -> dict:  # type: ignore[no-untyped-def]
    assert response.status_code == status, response.text
    body = response.json()
    assert set(body) == {"error"}
    # a 5xx also names the request id that the API's log lines about it carry
    assert set(body["error"]) == ({"code", "message", "request_id"} if status >= 500 else {"code", "message"})
    assert body["error"]["code"] and body["error"]["message"]
    return body["error"]


@pytest.mark.parametrize("case", list(BAD_IMAGE_BODIES), ids=list(BAD_IMAGE_BODIES))
def test_bad_image_request_is_rejected_and_queues_nothing(service: Service, case: str) -> None:
    body, status = BAD_IMAGE_BODIES[case]
    before = _queued_state(service)
    with service.client() as client:
        _assert_error_shape(client.post("/v1/images", json=body), status)
    assert _queued_state(service) == before


@pytest.mark.parametrize("case", list(BAD_VIDEO_BODIES), ids=list(BAD_VIDEO_BODIES))
def test_bad_video_request_is_rejected_and_queues_nothing(service: Service, case: str) -> None:
    body, status = BAD_VIDEO_BODIES[case]
    before = _queued_state(service)
    with service.client() as client:
        _assert_error_shape(client.post("/v1/videos", json={"model": "vid", **body}), status)
    assert _queued_state(service) == before


def test_a_webhook_without_a_signing_secret_is_422_saying_what_to_set(service: Service) -> None:
    """Auth is off and DIT_WEBHOOK_SECRET unset: there is nothing to sign a webhook with."""
    before = _queued_state(service)
    response = service.client().post("/v1/images", json={**VALID, "webhook_url": "https://10.0.0.1/in"})
    error = _assert_error_shape(response, 422)
    assert error["code"] == "no_webhook_secret" and "DIT_WEBHOOK_SECRET" in error["message"]
    assert _queued_state(service) == before


def test_non_json_body_is_422(service: Service) -> None:
    before = _queued_state(service)
    with service.client() as client:
        response = client.post(
            "/v1/images", content=b"{not json", headers={"content-type": "application/json"}
        )
    assert _assert_error_shape(response, 422)["code"] == "invalid_json"
    assert _queued_state(service) == before


def test_wrong_content_type_is_415(service: Service) -> None:
    before = _queued_state(service)
    with service.client() as client:
        response = client.post(
            "/v1/images", content=b'{"prompt": "red circle"}', headers={"content-type": "text/plain"}
        )
    assert _assert_error_shape(response, 415)["code"] == "unsupported_media_type"
    assert _queued_state(service) == before


def test_unknown_label_lists_valid_labels(service: Service) -> None:
    with service.client() as client:
        error = _assert_error_shape(client.post("/v1/images", json={"prompt": "purple elephant"}), 422)
    assert error["code"] == "unknown_label"
    assert "red circle" in error["message"]


def test_unknown_model_names_served_models(service: Service) -> None:
    with service.client() as client:
        error = _assert_error_shape(client.post("/v1/images", json={**VALID, "model": "nope"}), 422)
    assert error["code"] == "unknown_model"
    assert "img" in error["message"] and "vid" in error["message"]


def test_unknown_job_is_404(service: Service) -> None:
    with service.client() as client:
        assert _assert_error_shape(client.get("/v1/jobs/doesnotexist"), 404)["code"] == "job_not_found"
        assert _assert_error_shape(client.delete("/v1/jobs/doesnotexist"), 404)["code"] == "job_not_found"
        assert (
            _assert_error_shape(client.get("/v1/jobs/doesnotexist/outputs/0"), 404)["code"] == "job_not_found"
        )


def test_output_index_out_of_range_is_404(service: Service) -> None:
    with service.client() as client:
        job = client.post("/v1/images", json={**VALID, "num_inference_steps": 2}).json()
        wait_for_status(client, job["id"], {"completed"})
        assert client.get(f"/v1/jobs/{job['id']}/outputs/0").status_code == 200
        error = _assert_error_shape(client.get(f"/v1/jobs/{job['id']}/outputs/1"), 404)
        assert error["code"] == "output_not_found"
        _assert_error_shape(client.get(f"/v1/jobs/{job['id']}/outputs/-1"), 404)
        _assert_error_shape(client.get(f"/v1/jobs/{job['id']}/outputs/x"), 422)


def test_unknown_route_has_error_shape(service: Service) -> None:
    with service.client() as client:
        assert _assert_error_shape(client.get("/v1/nothing-here"), 404)["code"] == "not_found"


def test_an_output_gone_from_storage_is_404_output_not_found(service: Service) -> None:
    with service.client() as client:
        job = client.post("/v1/images", json={**VALID, "n": 2, "num_inference_steps": 2}).json()
        done = wait_for_status(client, job["id"], {"completed"})
        stored = service.tmp / "outputs" / "jobs" / job["id"] / "0.png"  # LocalStorage under DIT_OUTPUT_DIR
        assert stored.is_file()
        stored.unlink()
        error = _assert_error_shape(client.get(done["outputs"][0]["url"]), 404)
        assert error["code"] == "output_not_found" and "gone from storage" in error["message"]
        # the job and its other output are untouched
        assert client.get(f"/v1/jobs/{job['id']}").json()["status"] == "completed"
        assert client.get(done["outputs"][1]["url"]).headers["content-type"] == "image/png"


def test_an_unexpected_fault_is_a_500_in_the_error_shape_and_the_api_serves_on(service: Service) -> None:
    route = {"route": "/v1/jobs/{job_id}", "method": "GET", "status": "500"}
    key = ("dit_http_requests_total", frozenset(route.items()))
    counted_before = scrape(f"{service.base_url}/metrics").get(key, 0.0)  # the series starts at the first 500
    with service.client() as client:
        job = client.post("/v1/images", json={**VALID, "num_inference_steps": 2}).json()
        wait_for_status(client, job["id"], {"completed"})
        # a record no API or worker code writes: reading it raises deep in the API
        Redis.from_url(service.redis_url).hset(record_key(job["id"]), RecordField.PROGRESS.value, "lots")
        for params in ({}, {"wait": 1}):  # on one keep-alive connection: the 500 must not drop it
            sent = f"fault-{len(params)}"
            response = client.get(f"/v1/jobs/{job['id']}", params=params, headers={"X-Request-ID": sent})
            error = _assert_error_shape(response, 500)
            assert error["request_id"] == sent
            # no exception text for the client; the exception is in the API's log under the request id
            assert error["code"] == "internal_error" and "ValueError" not in error["message"]
            assert "lots" not in error["message"]
            assert error["request_id"] == response.headers["x-request-id"]
            logged = service.api_log().split(f"(request {error['request_id']})", 1)
            assert len(logged) == 2 and "ValueError" in logged[1], service.api_log()[-2000:]
        # the process is still up and answers everything else as before
        assert client.get("/healthz").json() == {"status": "ok"}
        other = client.post("/v1/images", json={**VALID, "num_inference_steps": 2}).json()
        assert wait_for_status(client, other["id"], {"completed"})["progress"] == 100
    counted = scrape(f"{service.base_url}/metrics")
    assert metric(counted, "dit_http_requests_total", **route) == counted_before + 2


def _chunks(total: int, chunk: int = 8192) -> Iterator[bytes]:
    """A body of `total` bytes sent chunked (no Content-Length), in `chunk`-byte pieces."""
    for start in range(0, total, chunk):
        yield b" " * min(chunk, total - start)


def test_a_body_over_the_limit_is_413_by_length_or_by_chunks_and_queues_nothing(service: Service) -> None:
    before = _queued_state(service)
    rejected = {"kind": "image", "reason": "body_too_large"}
    counted_before = metric(scrape(f"{service.base_url}/metrics"), "dit_jobs_rejected_total", **rejected)
    json_type = {"content-type": "application/json"}
    with service.client() as client:
        by_length = client.post("/v1/images", content=b" " * (MAX_BODY_BYTES + 1), headers=json_type)
        assert _assert_error_shape(by_length, 413)["code"] == "body_too_large"
        # chunked: no Content-Length, refused once the count passes the limit, not after 1 MB
        by_chunks = client.post("/v1/images", content=_chunks(1 << 20), headers=json_type)
        assert "content-length" not in by_chunks.request.headers
        assert _assert_error_shape(by_chunks, 413)["code"] == "body_too_large"
        assert str(MAX_BODY_BYTES) in by_chunks.json()["error"]["message"]
        # the server serves on: a JSON body just under the limit is read (and judged on its content)
        padded = json.dumps({"prompt": "red circle", "num_inference_steps": 2})
        padded = padded[:-1] + " " * (MAX_BODY_BYTES - len(padded)) + "}"
        assert len(padded.encode()) == MAX_BODY_BYTES
        accepted = client.post("/v1/images", content=padded, headers=json_type)
        assert accepted.status_code == 202, accepted.text
        assert wait_for_status(client, accepted.json()["id"], {"completed"})["progress"] == 100
        chunked_under = client.post("/v1/images", content=_chunks(MAX_BODY_BYTES), headers=json_type)
        assert _assert_error_shape(chunked_under, 422)["code"] == "invalid_json"  # read whole: blank
        assert client.get("/healthz").json() == {"status": "ok"}
    jobs, queued = _queued_state(service)
    assert (jobs, queued) == (before[0] + 2, before[1])  # only the one under the limit (dit: and rq: keys)
    counted = metric(scrape(f"{service.base_url}/metrics"), "dit_jobs_rejected_total", **rejected)
    assert counted == counted_before + 2


@pytest.mark.parametrize(
    ("sent", "kept"),
    [
        ("req-42.a_b:c", True),
        ("x" * 128, True),
        ("x" * 129, False),
        ("two words", False),
        ("tab\there", False),
        ("", False),
    ],
)
def test_every_answer_carries_x_request_id(service: Service, sent: str, kept: bool) -> None:
    with service.client() as client:
        answers = [
            client.get("/healthz", headers={"X-Request-ID": sent}),  # 2xx
            client.get("/v1/jobs/doesnotexist", headers={"X-Request-ID": sent}),  # 4xx
        ]
    for response in answers:
        request_id = response.headers["x-request-id"]
        assert (request_id == sent) is kept
        assert re.fullmatch(r"[A-Za-z0-9._~:+/=@-]{1,128}", request_id)
