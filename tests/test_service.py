"""End to end over real HTTP, a real Redis and a real worker process: submit, poll, download, decode."""

import io
from concurrent.futures import ThreadPoolExecutor

import av
import numpy as np
from PIL import Image
from redis import Redis

from tests.conftest import Service, paused, wait_for_status

MAX_PIXEL_DIFF = 1  # out of 255: CPU fp32 batched vs solo


def _image(data: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))


def test_image_job_completes_and_png_decodes(service: Service) -> None:
    with service.client() as client:
        response = client.post("/v1/images", json={"prompt": "Blue  TRIANGLE", "n": 2, "seed": 7})
        assert response.status_code == 202
        job = response.json()
        assert response.headers["location"] == f"/v1/jobs/{job['id']}"
        assert job["object"] == "job" and job["kind"] == "image" and job["model"] == "img"
        assert job["request"]["class_labels"] == [2 * 4 + 2] * 2  # blue = colour 2, triangle = shape 2
        done = wait_for_status(client, job["id"], {"completed", "failed"})
        assert done["status"] == "completed", done
        assert done["progress"] == 100 and done["error"] is None
        assert done["started_at"] >= done["created_at"] and done["completed_at"] >= done["started_at"]
        assert [(o["index"], o["seed"], o["width"], o["height"]) for o in done["outputs"]] == [
            (0, 7, 32, 32),
            (1, 8, 32, 32),
        ]
        first = client.get(done["outputs"][0]["url"])
        second = client.get(done["outputs"][1]["url"])
    assert first.headers["content-type"] == "image/png"
    a, b = _image(first.content), _image(second.content)
    assert a.shape == (32, 32, 3) and a.std() > 1  # a real picture, not a constant
    assert not np.array_equal(a, b)  # seed 7 and seed 8 differ


def test_video_job_completes_and_mp4_decodes(service: Service) -> None:
    with service.client() as client:
        job = client.post(
            "/v1/videos", json={"model": "vid", "prompt": "red circle moving left", "num_frames": 8, "fps": 4}
        ).json()
        done = wait_for_status(client, job["id"], {"completed", "failed"})
        assert done["status"] == "completed", done
        output = done["outputs"][0]
        assert output["num_frames"] == 8 and output["content_type"] == "video/mp4"
        data = client.get(output["url"]).content
    with av.open(io.BytesIO(data)) as container:
        stream = container.streams.video[0]
        assert stream.codec_context.name == "h264"
        frames = [frame.to_ndarray(format="rgb24") for frame in container.decode(stream)]
    assert len(frames) == 8 and frames[0].shape == (32, 32, 3)


def test_other_formats_have_their_content_types(service: Service) -> None:
    cases = [
        ("/v1/images", {"prompt": "red circle", "output_format": "jpeg"}, "image/jpeg"),
        ("/v1/images", {"prompt": "red circle", "output_format": "webp"}, "image/webp"),
        (
            "/v1/videos",
            {"model": "vid", "prompt": "red circle moving up", "output_format": "gif", "num_frames": 4},
            "image/gif",
        ),
    ]
    with service.client() as client:
        ids = [
            (client.post(path, json={**body, "num_inference_steps": 3}).json()["id"], kind)
            for path, body, kind in cases
        ]
        for job_id, content_type in ids:
            done = wait_for_status(client, job_id, {"completed", "failed"})
            response = client.get(done["outputs"][0]["url"])
            assert response.headers["content-type"] == content_type
            Image.open(io.BytesIO(response.content)).verify()


def test_server_picks_and_records_a_seed(service: Service) -> None:
    with service.client() as client:
        job = client.post("/v1/images", json={"class_labels": [3], "num_inference_steps": 2}).json()
        assert isinstance(job["request"]["seed"], int) and 0 <= job["request"]["seed"] < 2**63
        done = wait_for_status(client, job["id"], {"completed"})
    assert done["outputs"][0]["seed"] == job["request"]["seed"]


def _sixteen_requests() -> list[dict]:
    """Compatible requests (one size and step count) with different labels, guidance and seeds."""
    body = {"num_inference_steps": 10, "guidance_scale": 3.0}
    requests = [{**body, "prompt": "green square", "seed": 1234}]
    for k in range(1, 16):
        requests.append(
            {**body, "class_labels": [k % 24], "guidance_scale": 1.0 + k % 5, "seed": 1234 + k * 1000}
        )
    return requests


def test_sixteen_jobs_share_one_batch_and_each_matches_its_solo_run(service: Service) -> None:
    redis = Redis.from_url(service.redis_url)
    requests = _sixteen_requests()
    one_batch = f"batch of {len(requests)} outputs from {len(requests)} jobs"
    batches_before = service.worker_log().count(one_batch)
    with service.client() as client:
        # The worker is paused while the sixteen arrive, so they are all queued when it next takes a batch.
        with paused(service.workers[0]), ThreadPoolExecutor(len(requests)) as pool:
            ids = list(pool.map(lambda body: client.post("/v1/images", json=body).json()["id"], requests))
            assert {client.get(f"/v1/jobs/{job_id}").json()["status"] for job_id in ids} == {"queued"}
        batched = [client.get(f"/v1/jobs/{job_id}", params={"wait": 60}).json() for job_id in ids]
        batched_pixels = [_image(client.get(job["outputs"][0]["url"]).content) for job in batched]

        # Then each request alone: one job in the queue, so one job in its batch.
        solo: list[str] = []
        solo_pixels = []
        for body in requests:
            job = client.post("/v1/images", json=body).json()
            done = client.get(f"/v1/jobs/{job['id']}", params={"wait": 60}).json()
            solo.append(job["id"])
            solo_pixels.append(_image(client.get(done["outputs"][0]["url"]).content))

    assert [job["status"] for job in batched] == ["completed"] * len(requests)
    executions = [redis.hget(f"dit:job:{job_id}", "execution") for job_id in ids]
    assert len(set(executions)) == 1, f"16 queued compatible jobs ran in {len(set(executions))} batches"
    assert service.worker_log().count(one_batch) == batches_before + 1
    solo_executions = {redis.hget(f"dit:job:{job_id}", "execution") for job_id in solo}
    assert len(solo_executions) == len(requests) and not solo_executions & set(executions)
    assert [job["request"]["seed"] for job in batched] == [body["seed"] for body in requests]
    for k, (alone, together) in enumerate(zip(solo_pixels, batched_pixels, strict=True)):
        diff = np.abs(together.astype(int) - alone.astype(int)).max()
        assert diff <= MAX_PIXEL_DIFF, (
            f"job {k}: same request gave outputs {diff}/255 apart alone and in a batch"
        )
    # the sixteen are sixteen different pictures, so matching each one's own solo run means something
    assert len({pixels.tobytes() for pixels in batched_pixels}) == len(requests)


def test_models_endpoint_describes_served_models(service: Service) -> None:
    with service.client() as client:
        body = client.get("/v1/models").json()
    assert body["object"] == "list"
    models = {model["name"]: model for model in body["data"]}
    assert set(models) == {"img", "vid"}
    img, vid = models["img"], models["vid"]
    assert (img["kind"], img["family"], img["sizes"], img["default_size"]) == (
        "image",
        "dit",
        ["32x32"],
        "32x32",
    )
    assert img["labels"][:2] == ["red circle", "red square"] and len(img["labels"]) == 24
    assert img["defaults"] == {"num_inference_steps": 25, "guidance_scale": 4.0, "num_frames": None}
    assert vid["kind"] == "video" and vid["defaults"]["num_frames"] == 16 and vid["max_frames"] == 16


def test_health_readiness_and_metrics(service: Service) -> None:
    with service.client() as client:
        assert client.get("/healthz").json() == {"status": "ok"}
        ready = client.get("/readyz")
        assert ready.status_code == 200 and ready.json()["workers"] == 1
        client.post("/v1/images", json={"prompt": "red circle", "num_inference_steps": 1})
        metrics = client.get("/metrics").text
    assert 'dit_jobs_accepted_total{kind="image",model="img"}' in metrics
    assert "dit_queue_depth" in metrics
    assert 'dit_http_requests_total{method="POST",route="/v1/images",status="202"}' in metrics


def test_jobs_are_visible_to_rq_tooling(service: Service) -> None:
    from rq import Queue, Worker
    from rq.registry import FinishedJobRegistry

    with service.client() as client:
        job = client.post("/v1/images", json={"prompt": "red circle", "num_inference_steps": 1}).json()
        wait_for_status(client, job["id"], {"completed"})
    redis = Redis.from_url(service.redis_url)
    queue = Queue("dit-serve.img", connection=redis)
    assert job["id"] in FinishedJobRegistry(queue=queue).get_job_ids()
    assert queue.fetch_job(job["id"]).get_status() == "finished"
    assert [worker.name for worker in Worker.all(queue=queue)] == service.live_workers()  # `rq info` lists it
