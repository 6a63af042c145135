"""The FastAPI application: routers, error shapes, the Redis client, the lost-job reaper, the webhook
sender."""

import logging
import threading
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI
from redis import Redis
from redis.asyncio import Redis as AsyncRedis
from redis.exceptions import RedisError

from app.docs_ui import install_docs_ui
from app.errors import install_error_handlers
from app.metrics import APIMetrics, RequestMetrics
from app.middleware import BodyLimit, RequestID
from app.openapi import install_openapi
from app.playground import install_playground
from app.routes import events, generation, jobs, loras, openai_images, openai_videos, system
from app.webhook_sender import WebhookSender
from dit_serve.config import Settings, get_settings
from dit_serve.queueing import reap_lost_jobs
from dit_serve.retention import SWEEP_BATCH, sweep_expired_jobs
from dit_serve.storage import Storage, storage_from_settings

log = logging.getLogger(__name__)
REDIS_TIMEOUT_S = 5.0


def _reap_forever(redis: Redis, settings: Settings, stop: threading.Event) -> None:
    """Requeue jobs of dead workers, and fail orphaned ones, even when no worker is alive to do it."""
    while not stop.wait(settings.reap_interval_s):
        try:
            reap_lost_jobs(redis, settings.orphan_timeout_s, settings.job_ttl_s, settings.priority_aging_s)
        except RedisError as exc:
            log.warning("reaper: redis unavailable: %s", exc)


def _sweep_forever(redis: Redis, storage: Storage, settings: Settings, stop: threading.Event) -> None:
    """Delete the records and outputs of jobs past their retention (dit_serve/retention.py).

    A thread of its own: S3 deletes can take a while, and must not hold up the reaper. Every replica
    runs one; they share the work without ever sweeping a job twice at once.
    """
    while not stop.wait(settings.reap_interval_s):
        try:
            while not stop.is_set():
                swept = sweep_expired_jobs(
                    redis,
                    storage,
                    grace_s=settings.expired_grace_s,
                    delete_outputs=settings.delete_outputs,
                )
                if len(swept) < SWEEP_BATCH:
                    break
        except RedisError as exc:
            log.warning("retention sweep: redis unavailable: %s", exc)
        except Exception:  # a fault in one pass must not end the sweeping for the process' lifetime
            log.exception("retention sweep failed; retried in %.0f s", settings.reap_interval_s)


def create_app(settings: Settings | None = None) -> FastAPI:
    """Build the API for `settings` (default: from the environment)."""
    settings = settings or get_settings()
    if not settings.redis_url:
        raise SystemExit("the API needs --redis-url (or REDIS_URL); `dit-serve up` starts a Redis for you")
    redis = Redis.from_url(
        settings.redis_url, socket_timeout=REDIS_TIMEOUT_S, socket_connect_timeout=REDIS_TIMEOUT_S
    )
    # For `GET /v1/jobs/{id}?wait=`: blocking waits on an asyncio client hold no worker thread.
    waits = AsyncRedis.from_url(settings.redis_url, socket_connect_timeout=REDIS_TIMEOUT_S)
    stop = threading.Event()

    @asynccontextmanager
    async def lifespan(_app: FastAPI) -> AsyncIterator[None]:
        reaper = threading.Thread(target=_reap_forever, args=(redis, settings, stop), daemon=True)
        reaper.start()
        sweeper = threading.Thread(
            target=_sweep_forever, args=(redis, app.state.storage, settings, stop), daemon=True
        )
        sweeper.start()
        sender = WebhookSender(redis, settings, app.state.metrics)
        threading.Thread(target=sender.run, args=(stop,), name="webhooks", daemon=True).start()
        yield
        stop.set()
        redis.close()
        await waits.aclose()

    app = FastAPI(title="dit-serve", version="0.1.0", lifespan=lifespan, docs_url=None, redoc_url=None)
    install_docs_ui(app)  # /docs and /redoc without a CDN
    install_openapi(app)  # every route's errors in our shape, not FastAPI's default 422
    install_playground(app)  # / : try the API from a browser, offline
    app.state.settings = settings
    app.state.redis = redis
    app.state.waits = waits
    app.state.storage = storage_from_settings(settings)
    app.state.metrics = APIMetrics(redis, settings.worker_metrics_url)
    # Later middlewares run outside earlier ones, and all are plain ASGI (no `@app.middleware("http")`,
    # whose task group would turn the body limit's error, raised while FastAPI reads the body, into a
    # 400). The body limit goes innermost; the metrics see every error answer, its 413s included, and
    # every answer leaves through RequestID.
    app.add_middleware(BodyLimit, max_bytes=settings.max_body_bytes, on_error=app.state.metrics.error)
    install_error_handlers(app, app.state.metrics.error)
    app.add_middleware(RequestMetrics, metrics=app.state.metrics)  # after: it counts the error answers too
    app.add_middleware(RequestID)
    openai_videos.add_create_route(app)  # first: it must be tried before our JSON POST /v1/videos
    for router in (
        openai_videos.router,
        openai_images.router,
        generation.router,
        jobs.router,
        events.router,
        system.router,
        loras.router,
    ):
        app.include_router(router)
    return app
