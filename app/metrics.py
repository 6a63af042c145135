"""Prometheus metrics of the API process (the full metric set comes with the observability issue)."""

import time
from collections.abc import Awaitable, Callable

from fastapi import Request, Response
from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import GaugeMetricFamily
from redis import Redis
from redis.exceptions import RedisError

from dit_serve.queueing import dit_queues

LATENCY_BUCKETS = (0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)


class QueueDepthCollector:
    """Queue depth per model queue, read from Redis at scrape time."""

    def __init__(self, redis: Redis):
        self.redis = redis

    def collect(self):  # type: ignore[no-untyped-def]
        depth = GaugeMetricFamily("dit_queue_depth", "Jobs waiting in each queue", labels=["queue"])
        try:
            for queue in dit_queues(self.redis):
                depth.add_metric([queue.name], queue.count)
        except RedisError:
            pass
        yield depth


class APIMetrics:
    """The API's own registry, so tests and several apps in one process do not collide."""

    def __init__(self, redis: Redis):
        self.registry = CollectorRegistry()
        self.requests = Counter(
            "dit_http_requests_total", "HTTP requests", ["route", "method", "status"], registry=self.registry
        )
        self.latency = Histogram(
            "dit_http_request_seconds",
            "HTTP request latency",
            ["route", "method"],
            buckets=LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.accepted = Counter(
            "dit_jobs_accepted_total", "Jobs accepted", ["kind", "model"], registry=self.registry
        )
        self.registry.register(QueueDepthCollector(redis))

    async def middleware(
        self, request: Request, call_next: Callable[[Request], Awaitable[Response]]
    ) -> Response:
        start = time.perf_counter()
        response = await call_next(request)
        route = request.scope.get("route")
        path = getattr(route, "path", "unmatched")
        self.requests.labels(path, request.method, str(response.status_code)).inc()
        self.latency.labels(path, request.method).observe(time.perf_counter() - start)
        return response
