"""A Python client of the dit-serve API: `Client` (blocking) and `AsyncClient` (asyncio), on httpx.

    from dit_serve.client import Client

    with Client() as client:  # DIT_URL, DIT_API_KEY, else http://127.0.0.1:8000 without a key
        job = client.generate_image("red circle", n=2, seed=42)
        print(client.save(job, "red-circle.png"))  # red-circle-0.png, red-circle-1.png

It imports neither torch nor the web stack (tests/test_architecture.py checks), so it installs with
the base package on any machine that can reach the API.
"""

from dit_serve.client.aio import AsyncClient
from dit_serve.client.calls import build_submission
from dit_serve.client.errors import APIError, DitServeError, JobFailedError, WaitTimeoutError
from dit_serve.client.events import JobEnded, JobEvent, StreamDroppedError
from dit_serve.client.outputs import output_paths
from dit_serve.client.retries import RetryPolicy
from dit_serve.client.sync import Client
from dit_serve.events import PreviewEvent, ProgressEvent, QueuedEvent, StartedEvent
from dit_serve.schemas import ImageRequest, JobBody, VideoRequest

Job = JobBody  # the job object, as GET /v1/jobs/{id} answers it

__all__ = [
    "APIError",
    "AsyncClient",
    "Client",
    "DitServeError",
    "ImageRequest",
    "Job",
    "JobEnded",
    "JobEvent",
    "JobFailedError",
    "PreviewEvent",
    "ProgressEvent",
    "QueuedEvent",
    "RetryPolicy",
    "StartedEvent",
    "StreamDroppedError",
    "VideoRequest",
    "WaitTimeoutError",
    "build_submission",
    "output_paths",
]
