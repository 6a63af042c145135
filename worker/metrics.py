"""A worker's Prometheus metrics, in its own registry, served on its own port (`--metrics-port`).

Each worker process exports its own series and Prometheus scrapes every worker (compose finds the
replicas by DNS); `dit-serve up` also hands them to the API's /metrics, so one host is one target.
Every (model, kind) series is created at start-up, at zero, so that rates and alerts see it before
the first job.
"""

import os
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import torch
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from dit_serve.jobs import OutputRecord
from dit_serve.metrics import (
    BATCH_ROWS_BUCKETS,
    FINISHED_STATUSES,
    JOB_SECONDS_BUCKETS,
    STAGE_SECONDS_BUCKETS,
    WORKER_ERROR_CODES,
)
from models.loading import LoadedModel
from worker.batching import JobTicket
from worker.stages import CONDITIONS, DECODE, ENCODE, SAMPLING, STORE, StageTimer

PAGE_BYTES = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096


def resident_bytes() -> int | None:
    """This process' resident set (where a CPU worker's weights and activations live); None off Linux."""
    try:
        with open("/proc/self/statm") as statm:
            return int(statm.read().split()[1]) * PAGE_BYTES
    except OSError:
        return None


class DeviceMemoryCollector(Collector):
    """Model memory at scrape time: CUDA allocated and reserved bytes, or the resident set on the CPU."""

    def __init__(self, device: torch.device):
        self.device = device

    def collect(self) -> Iterator[GaugeMetricFamily]:
        family = GaugeMetricFamily(
            "dit_worker_device_memory_bytes",
            "Memory of the worker's models: CUDA allocated/reserved, or the process' resident set on CPU",
            labels=["device", "type"],
        )
        if self.device.type == "cuda":
            family.add_metric([str(self.device), "allocated"], torch.cuda.memory_allocated(self.device))
            family.add_metric([str(self.device), "reserved"], torch.cuda.memory_reserved(self.device))
        elif (resident := resident_bytes()) is not None:
            family.add_metric(["cpu", "resident"], resident)
        yield family


COMPUTED, SKIPPED = "computed", "skipped"
CACHED_STEP_OUTCOMES = (COMPUTED, SKIPPED)


class WorkerMetrics:
    """The histograms, counters and gauges of one worker process."""

    def __init__(self, device: torch.device, batching: str):
        self.device = device
        self.registry = registry = CollectorRegistry()
        labels = ["model", "kind"]

        def stage(name: str, what: str) -> Histogram:
            return Histogram(name, what, labels, buckets=STAGE_SECONDS_BUCKETS, registry=registry)

        self.queue_wait = Histogram(
            "dit_queue_wait_seconds",
            "From a job's acceptance to the start of its batch",
            labels,
            buckets=JOB_SECONDS_BUCKETS,
            registry=registry,
        )
        self.job_latency = Histogram(
            "dit_job_latency_seconds",
            "From a job's acceptance to its outputs being stored (completed jobs)",
            labels,
            buckets=JOB_SECONDS_BUCKETS,
            registry=registry,
        )
        self.stages = {
            CONDITIONS: stage("dit_conditioning_seconds", "Conditions of a batch (text encoding)"),
            SAMPLING: stage("dit_sampling_loop_seconds", "A batch's whole denoising loop"),
            DECODE: stage("dit_vae_decode_seconds", "VAE decode of a batch's finished latents"),
            ENCODE: stage("dit_output_encode_seconds", "Encoding one output (PNG/JPEG/WebP, MP4/GIF)"),
            STORE: stage("dit_storage_write_seconds", "Writing one output to storage"),
        }
        self.step = stage("dit_denoise_step_seconds", "One denoising step of a batch (all its rows)")
        self.batch_rows = Histogram(
            "dit_batch_rows",
            "Rows (outputs) in the batch of each denoising step",
            labels,
            buckets=BATCH_ROWS_BUCKETS,
            registry=registry,
        )
        self.finished = Counter(
            "dit_jobs_finished",
            "Jobs this worker ended, by status and error code",
            [*labels, "status", "code"],
            registry=registry,
        )
        self.cached_steps = Counter(
            "dit_cached_row_steps",
            "Denoising steps of output rows that asked for step caching: whether their blocks ran",
            [*labels, "outcome"],
            registry=registry,
        )
        self.interleaved = Counter(
            "dit_interleaved_batches",
            "Batches run inside a paused run of another model (worker/interleave.py)",
            labels,
            registry=registry,
        )
        self.images = Counter("dit_images_generated", "Images stored", ["model"], registry=registry)
        self.frames = Counter(
            "dit_video_frames_generated", "Video frames stored", ["model"], registry=registry
        )
        self.videos = Counter("dit_videos_generated", "Videos stored", ["model"], registry=registry)
        self.busy = Counter(
            "dit_worker_busy_seconds", "Time spent running batches (rate = busy ratio)", registry=registry
        )
        self.loaded = Gauge(
            "dit_worker_models_loaded",
            "Models this worker holds (1 each)",
            ["model", "kind", "family"],
            registry=registry,
        )
        self.info = Gauge(
            "dit_worker_info",
            "This worker's device and batching mode",
            ["device", "batching"],
            registry=registry,
        )
        self.info.labels(str(device), batching).set(1)
        registry.register(DeviceMemoryCollector(device))

    def add_model(self, model: LoadedModel) -> None:
        """A model is loaded: create every series of it, at zero."""
        key = (model.name, model.kind)
        self.loaded.labels(*key, model.family).set(1)
        for histogram in (
            self.queue_wait,
            self.job_latency,
            self.step,
            self.batch_rows,
            *self.stages.values(),
        ):
            histogram.labels(*key)
        for outcome in CACHED_STEP_OUTCOMES:
            self.cached_steps.labels(*key, outcome)
        self.interleaved.labels(*key)
        for status in FINISHED_STATUSES:
            for code in WORKER_ERROR_CODES if status == "failed" else ("",):
                self.finished.labels(*key, status, code)
        (self.frames if model.kind == "video" else self.images).labels(model.name)
        if model.kind == "video":
            self.videos.labels(model.name)

    def serve(self, host: str, port: int) -> None:
        """Serve /metrics on host:port from a daemon thread; exits with advice when the port is taken."""
        try:
            start_http_server(port, addr=host, registry=self.registry)
        except OSError as exc:
            raise SystemExit(
                f"cannot serve worker metrics on {host}:{port} ({exc}): pick a free port with "
                "--metrics-port (DIT_METRICS_PORT), or 0 to turn the worker's /metrics off"
            ) from exc

    # -- what the worker reports ----------------------------------------------------------------------
    def taken(self, tickets: list[JobTicket]) -> None:
        now = time.time()
        for ticket in tickets:
            if ticket.created_at:
                self.queue_wait.labels(ticket.model, ticket.kind).observe(max(0.0, now - ticket.created_at))

    def stepped(self, model: str, kind: str, rows_per_step: list[int], seconds: float) -> None:
        """A denoising loop of len(rows_per_step) steps took `seconds`; each step gets the mean time.

        Timed as a whole so that no step waits for the GPU; continuous batching times each step.
        """
        if not rows_per_step:
            return
        for rows in rows_per_step:
            self.step.labels(model, kind).observe(seconds / len(rows_per_step))
            self.batch_rows.labels(model, kind).observe(rows)

    def cached(self, model: str, kind: str, computed: int, skipped: int) -> None:
        """Row steps of cached rows that ran their blocks (`computed`) and that skipped them."""
        self.cached_steps.labels(model, kind, COMPUTED).inc(computed)
        self.cached_steps.labels(model, kind, SKIPPED).inc(skipped)

    def ended(
        self, ticket: JobTicket, status: str, code: str = "", outputs: list[OutputRecord] | None = None
    ) -> None:
        self.finished.labels(ticket.model, ticket.kind, status, code).inc()
        if status != "completed":
            return
        if ticket.created_at:
            self.job_latency.labels(ticket.model, ticket.kind).observe(
                max(0.0, time.time() - ticket.created_at)
            )
        for output in outputs or []:
            if ticket.kind == "video":
                self.videos.labels(ticket.model).inc()
                self.frames.labels(ticket.model).inc(output.num_frames or 0)
            else:
                self.images.labels(ticket.model).inc()

    def waited(self, start: float) -> float:
        """Seconds since perf_counter() was `start`, once the device has done what was queued."""
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        return time.perf_counter() - start

    def timer(
        self,
        model: str,
        kind: str,
        spent: dict[str, float] | None = None,
        paused: Callable[[], float] | None = None,
    ) -> StageTimer:
        """Times stages of a batch of `model` (adding to `spent`); on CUDA a stage ends when the GPU does.
        `paused()`: seconds other batches ran inside this one so far (worker/interleave.py), left out."""

        @contextmanager
        def timed(stage: str) -> Iterator[None]:
            start, paused_at_start = time.perf_counter(), paused() if paused else 0.0
            yield
            seconds = self.waited(start) - ((paused() if paused else 0.0) - paused_at_start)
            self.stages[stage].labels(model, kind).observe(seconds)
            if spent is not None:
                spent[stage] = spent.get(stage, 0.0) + seconds

        return timed

    @contextmanager
    def working(self) -> Iterator[None]:
        start = time.perf_counter()
        try:
            yield
        finally:
            self.busy.inc(time.perf_counter() - start)
