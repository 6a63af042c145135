"""Prometheus metrics of the API process, plus the cluster's state read from Redis at scrape time.

The API exports what only it sees (requests, acceptances, rejections) and what lives in Redis (queue
depth, oldest queued job, live workers, jobs lost with their worker). Every series of a model that
a live worker serves exists from the first scrape, at 0, so panels and `increase()` see the first
event. Workers export their own metrics on their own port; with `worker_metrics_url` set (`dit-serve
up` sets it) the API's /metrics carries that worker's metrics too, so a one-host setup is one scrape
target.
"""

import logging
import time
import urllib.request
from collections.abc import Iterator

from fastapi import Request
from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.registry import Collector
from redis import Redis
from redis.exceptions import RedisError
from rq.utils import as_text
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from dit_serve.catalog import live_workers, served_models
from dit_serve.contract import JobKind, WebhookEvent
from dit_serve.jobs import RecordField, queue_name, record_key
from dit_serve.metrics import HTTP_SECONDS_BUCKETS
from dit_serve.queueing import QUEUE_PREFIX, dit_queues
from dit_serve.reaping import REAPED_FAILED, REAPED_KEY, REAPED_ORPHANED, REAPED_REQUEUED, REAPED_TIMED_OUT

log = logging.getLogger(__name__)

OLDEST_LOOKAHEAD = 64  # queued jobs looked at for the oldest (a requeued job may sit behind newer ones)
WORKER_SCRAPE_TIMEOUT_S = 2.0
REDIS_UP, REDIS_UP_HELP = "dit_redis_up", "Whether this scrape's reads from Redis succeeded (1) or not (0)"
SUBMISSION_ROUTES = {"/v1/images": JobKind.IMAGE, "/v1/videos": JobKind.VIDEO}
# Error codes a submission can be refused with (app/errors.py, app/submission.py), exported from the
# start at 0 so that a rejection-rate panel has a series before the first rejection.
REJECTION_REASONS = (
    "invalid_request",
    "invalid_json",
    "unsupported_media_type",
    "unknown_model",
    "wrong_kind",
    "unknown_label",
    "no_model",
    "redis_unavailable",
    "no_label_names",
    "unsupported_size",
    "queue_full",
    "rate_limited",
    "quota_exceeded",
    "idempotency_key_reused",
    "idempotency_key_in_use",
    "invalid_idempotency_key",
    "body_too_large",
    "unauthorized",
    "webhook_url_forbidden",
    "no_webhook_secret",
)
# What a cancel that took did (dit_serve.queueing.cancel_job), and what the reaper did with a lost job.
CANCEL_OUTCOMES = ("canceled", "cancel_requested")
REAPED_OUTCOMES = (REAPED_REQUEUED, REAPED_FAILED, REAPED_TIMED_OUT, REAPED_ORPHANED)
# What a webhook attempt led to: a 2xx (delivered), another attempt later, or none left (failed).
WEBHOOK_OUTCOMES = ("delivered", "retried", "failed")


class ClusterCollector(Collector):
    """Queue depth and oldest queued job per model, live workers and lost jobs, read from Redis.

    A served model that has no queue yet (no job so far) has a depth and an age of 0 and 0 lost jobs.
    """

    def __init__(self, redis: Redis):
        self.redis = redis

    def collect(self) -> Iterator[Metric]:
        depth = GaugeMetricFamily(
            "dit_queue_depth", "Jobs waiting in each model's queue", labels=["queue", "model"]
        )
        oldest = GaugeMetricFamily(
            "dit_queue_oldest_job_age_seconds",
            "Age of the oldest job waiting in each model's queue (0 when empty)",
            labels=["queue", "model"],
        )
        workers = GaugeMetricFamily("dit_workers_live", "Workers whose heartbeat is fresh")
        reaped = CounterMetricFamily(
            "dit_jobs_reaped",
            "Jobs reaped: requeued or failed (worker_lost) when their worker stopped heartbeating, "
            "timed_out (timeout) when they ran alone past their ceiling, "
            "or orphaned (no_worker) when queued with no live worker for their model",
            labels=["model", "outcome"],
        )
        try:
            now = time.time()
            models = served_models(self.redis)
            unqueued = set(models)
            for queue in dit_queues(self.redis):
                model = queue.name.removeprefix(QUEUE_PREFIX)
                ids = self.redis.lrange(queue.key, 0, OLDEST_LOOKAHEAD - 1)
                with self.redis.pipeline() as pipe:
                    pipe.llen(queue.key)
                    for job_id in ids:
                        pipe.hget(record_key(as_text(job_id)), RecordField.CREATED_AT.value)
                    count, *created = pipe.execute()
                times = [float(value) for value in created if value]
                depth.add_metric([queue.name, model], count)
                oldest.add_metric([queue.name, model], max(0.0, now - min(times)) if times else 0.0)
                unqueued.discard(model)
            for model in sorted(unqueued):
                depth.add_metric([queue_name(model), model], 0)
                oldest.add_metric([queue_name(model), model], 0.0)
            workers.add_metric([], len(live_workers(self.redis)))
            lost = {(model, outcome): 0.0 for model in models for outcome in REAPED_OUTCOMES}
            for field, value in self.redis.hgetall(REAPED_KEY).items():
                model, _, outcome = as_text(field).partition("|")
                lost[model, outcome] = float(value)
            for labels, count in lost.items():
                reaped.add_metric(list(labels), count)
        except RedisError as exc:
            log.warning("metrics: redis unavailable: %s", exc)
            # No cluster series rather than wrong ones; dit_http_* and this still tell the story.
            yield GaugeMetricFamily(REDIS_UP, REDIS_UP_HELP, value=0)
            return
        yield GaugeMetricFamily(REDIS_UP, REDIS_UP_HELP, value=1)
        yield from (depth, oldest, workers, reaped)


class ServedModelCounters(Collector):
    """The API's per-model counters (jobs accepted, cancels), with a 0 series for every served model.

    The models come from the live worker catalog, which changes while the API runs, so each scrape
    creates the missing children (`.labels(...)`) just before it reads the counters. The counters
    are unregistered (registry=None) and collected here, so that both happen in one scrape.
    """

    def __init__(self, redis: Redis, accepted: Counter, cancels: Counter):
        self.redis, self.accepted, self.cancels = redis, accepted, cancels

    def describe(self) -> Iterator[Metric]:
        yield from self.accepted.describe()
        yield from self.cancels.describe()

    def collect(self) -> Iterator[Metric]:
        try:
            models = served_models(self.redis)
        except RedisError:
            models = {}  # ClusterCollector reports it (dit_redis_up 0); the counts are still right
        for spec in models.values():
            self.accepted.labels(spec.kind, spec.name)
            for outcome in CANCEL_OUTCOMES:
                self.cancels.labels(spec.name, outcome)
        yield from self.accepted.collect()
        yield from self.cancels.collect()


class WorkerMetricsCollector(Collector):
    """A worker's /metrics, fetched at scrape time and re-exported (`dit-serve up`: one target)."""

    def __init__(self, url: str):
        self.url = url

    def collect(self) -> Iterator[Metric]:
        up = GaugeMetricFamily(
            "dit_worker_metrics_up", "Whether the worker's /metrics answered this scrape", labels=["url"]
        )
        try:
            with urllib.request.urlopen(self.url, timeout=WORKER_SCRAPE_TIMEOUT_S) as response:
                text = response.read().decode()
        except OSError as exc:
            log.warning("metrics: worker metrics at %s unreachable: %s", self.url, exc)
            up.add_metric([self.url], 0)
            yield up
            return
        up.add_metric([self.url], 1)
        yield up
        yield from text_string_to_metric_families(text)


class APIMetrics:
    """The API's own registry, so tests and several apps in one process do not collide."""

    def __init__(self, redis: Redis, worker_metrics_url: str | None = None):
        self.registry = CollectorRegistry()
        self.requests = Counter(
            "dit_http_requests", "HTTP requests", ["route", "method", "status"], registry=self.registry
        )
        self.latency = Histogram(
            "dit_http_request_seconds",
            "HTTP request latency",
            ["route", "method", "status"],
            buckets=HTTP_SECONDS_BUCKETS,
            registry=self.registry,
        )
        self.accepted = Counter("dit_jobs_accepted", "Jobs accepted", ["kind", "model"], registry=None)
        self.rejected = Counter(
            "dit_jobs_rejected",
            "Job submissions refused, by error code",
            ["kind", "reason"],
            registry=self.registry,
        )
        self.cancels = Counter(
            "dit_cancels",
            "DELETE /v1/jobs/{id} that took: canceled (was queued) or cancel_requested (was running)",
            ["model", "outcome"],
            registry=None,
        )
        self.webhook_attempts = Counter(
            "dit_webhook_attempts",
            "Webhook delivery attempts, by event and by what they led to",
            ["event", "outcome"],
            registry=self.registry,
        )
        for event in WebhookEvent:
            for outcome in WEBHOOK_OUTCOMES:
                self.webhook_attempts.labels(event.value, outcome)
        self.registry.register(ServedModelCounters(redis, self.accepted, self.cancels))
        for kind in SUBMISSION_ROUTES.values():
            for reason in REJECTION_REASONS:
                self.rejected.labels(kind.value, reason)
        self.registry.register(ClusterCollector(redis))
        if worker_metrics_url:
            self.registry.register(WorkerMetricsCollector(worker_metrics_url))

    def error(self, request: Request, status: int, code: str) -> None:
        """An error answer: a refused submission when it answers POST /v1/images or /v1/videos."""
        kind = SUBMISSION_ROUTES.get(request.url.path)
        if kind and request.method == "POST" and status >= 400:
            self.rejected.labels(kind.value, code).inc()


class RequestMetrics:
    """Count and time every HTTP answer by route template, method and status (plain ASGI)."""

    def __init__(self, app: ASGIApp, metrics: APIMetrics):
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        start = time.perf_counter()
        status = 500  # what the server answers if the app raises before answering

        async def send_tracked(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_tracked)
        finally:
            path = getattr(scope.get("route"), "path", "unmatched")  # the router sets the scope's route
            labels = (path, scope["method"], str(status))
            self.metrics.requests.labels(*labels).inc()
            self.metrics.latency.labels(*labels).observe(time.perf_counter() - start)
