"""The webhook sender: a thread in every API process, beside the reaper, and a small pool that sends.

Every tick (POLL_S) it does two things (the Redis side is dit_serve/webhooks.py):
1. Scan: read the state of the watched jobs and turn what changed into deliveries: `started` once a
   worker has started the job, `progress` while it runs (at most every 500 ms), and the final event
   once it has ended, however it ended (a worker, a cancel, a deadline, the reaper). One API process
   scans per tick (a lock), and creating a delivery is idempotent, so replicas never create one twice.
2. Send: claim due deliveries, at most as many as the pool has free threads (a claim is atomic and
   leased, so a delivery goes to one sender at a time), and attempt each: check the URL again and
   resolve it once, sign, POST to the checked address, and record the outcome and the next attempt.

Workers know nothing of webhooks, so a slow receiver never slows a batch; at worst it holds one
of this pool's threads for the 5 s deadline.
"""

import json
import logging
import os
import socket
import ssl
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime

from redis import Redis
from redis.exceptions import RedisError

from app.errors import APIError
from app.metrics import APIMetrics
from app.views import job_body
from dit_serve.config import Settings
from dit_serve.contract import WebhookEvent
from dit_serve.jobs import ENDED_STATUSES, STATUS_FROM_RQ, JobStatus, RecordField, record_key, rq_job_key
from dit_serve.keys import webhook_secret
from dit_serve.webhook_guard import (
    Connector,
    DeliveryResult,
    Resolver,
    WebhookURLRefused,
    check_url,
    post,
    system_resolver,
)
from dit_serve.webhook_signing import signed_headers
from dit_serve.webhooks import (
    PROGRESS_INTERVAL_S,
    SCAN_LOCK_KEY,
    Claim,
    claim_due,
    create_delivery,
    end_watch,
    forget_job,
    record_attempt,
    retry_delay_s,
    state_key,
    state_ttl_s,
    watched_jobs,
)

log = logging.getLogger(__name__)

POLL_S = 0.25
SCAN_LIMIT = 5000  # watched jobs read per tick
SENDER_THREADS = 8  # attempts in flight at once per API process
EVENT_TYPES = {WebhookEvent.STARTED: "job.started", WebhookEvent.PROGRESS: "job.progress"}
RECORD_FIELDS = [RecordField.STARTED_AT.value, RecordField.PROGRESS.value]
WATCH_FIELDS = ["events", "started:id", "progress:value", "progress:created_at"]


def signing_secret(redis: Redis, settings: Settings, owner: str | None) -> str | None:
    """The secret that signs the webhooks of `owner`'s jobs: its API key's, or DIT_WEBHOOK_SECRET for
    jobs sent with auth off; None when there is none (a revoked key, or no DIT_WEBHOOK_SECRET)."""
    if owner is not None:
        return webhook_secret(redis, owner)
    return settings.webhook_secret.get_secret_value() if settings.webhook_secret else None


def payload(event_type: str, job: dict[str, object]) -> bytes:
    """The body of a delivery, in Standard Webhooks' recommended shape: type, timestamp, data."""
    timestamp = datetime.now(UTC).isoformat().replace("+00:00", "Z")
    return json.dumps(
        {"type": event_type, "timestamp": timestamp, "data": job}, separators=(",", ":")
    ).encode()


class WebhookSender:
    """Turns watched jobs' state changes into deliveries, and sends the due ones (see the module)."""

    def __init__(
        self,
        redis: Redis,
        settings: Settings,
        metrics: APIMetrics | None = None,
        *,
        resolver: Resolver = system_resolver,
        connect: Connector = socket.create_connection,
        tls: ssl.SSLContext | None = None,
    ):
        self.redis, self.settings, self.metrics = redis, settings, metrics
        self.allow = settings.webhook_allow_list
        self.resolver, self.connect, self.tls = resolver, connect, tls
        self.ttl_s = state_ttl_s(
            settings.job_ttl_s, settings.webhook_backoff_s, settings.webhook_max_attempts
        )
        self.pool = ThreadPoolExecutor(SENDER_THREADS, thread_name_prefix="webhook")
        self.in_flight = threading.Semaphore(SENDER_THREADS)
        self.lock_owner = f"{socket.gethostname()}.{os.getpid()}"

    def run(self, stop: threading.Event) -> None:
        """Scan and send every POLL_S until `stop` is set."""
        while not stop.wait(POLL_S):
            try:
                self.scan()
                self.send_due()
            except RedisError as exc:
                log.warning("webhooks: redis unavailable: %s", exc)
            except Exception:  # never let one bad record stop every webhook of the process
                log.exception("webhooks: a pass failed")
        self.pool.shutdown(wait=False, cancel_futures=True)

    # -- scan: state changes into deliveries ----------------------------------------------------------

    def scan(self) -> None:
        """Create the deliveries that the watched jobs' state changes call for (one process per tick)."""
        if not self.redis.set(SCAN_LOCK_KEY, self.lock_owner, nx=True, px=int(POLL_S * 1000)):
            return
        job_ids = watched_jobs(self.redis, SCAN_LIMIT)
        with self.redis.pipeline(transaction=False) as pipe:
            for job_id in job_ids:
                pipe.exists(record_key(job_id))
                pipe.hget(rq_job_key(job_id), "status")
                pipe.hmget(record_key(job_id), RECORD_FIELDS)
                pipe.hmget(state_key(job_id), WATCH_FIELDS)
            replies = pipe.execute()
        for index, job_id in enumerate(job_ids):
            exists, rq_status, record, watch = replies[4 * index : 4 * index + 4]
            if not exists or watch[0] is None:
                forget_job(self.redis, job_id)  # the job is gone (expired, or taken back at enqueue)
            elif rq_status is not None:  # None: between its record and its RQ enqueue, so queued
                self._advance(job_id, STATUS_FROM_RQ.get(rq_status.decode(), JobStatus.QUEUED), record, watch)

    def _advance(self, job_id: str, status: JobStatus, record: list, watch: list) -> None:
        """Create what one job's state calls for: started, a progress event, the final event."""
        (started_at, progress), (events_field, started_id, last_value, last_at) = record, watch
        events = {WebhookEvent(name) for name in events_field.decode().split(",")}
        if (
            WebhookEvent.STARTED in events
            and started_at
            and status is not JobStatus.QUEUED
            and not started_id
        ):
            self._create(job_id, WebhookEvent.STARTED)
        if WebhookEvent.PROGRESS in events and status is JobStatus.IN_PROGRESS:
            due = last_at is None or time.time() - float(last_at) >= PROGRESS_INTERVAL_S
            if due and (progress or b"0") != (last_value or b"0"):
                self._create(job_id, WebhookEvent.PROGRESS)
        if status in ENDED_STATUSES and (
            WebhookEvent.COMPLETED not in events or self._create(job_id, WebhookEvent.COMPLETED)
        ):
            end_watch(self.redis, job_id, self.ttl_s)

    def _create(self, job_id: str, event: WebhookEvent) -> bool:
        """Create the job's delivery of `event` from its job object now, unless it exists; False when the
        job object could not be read (the next scan tries again, or finds the job gone)."""
        try:
            job = job_body(self.redis, job_id)
        except APIError:  # gone, or written by a newer API
            return False
        if event is WebhookEvent.COMPLETED and job.status not in ENDED_STATUSES:
            return False
        event_type = f"job.{job.status}" if event is WebhookEvent.COMPLETED else EVENT_TYPES[event]
        body = payload(event_type, job.model_dump(mode="json", exclude={"deliveries"}))
        if create_delivery(self.redis, job_id, event, event_type, body, job.progress):
            log.info("webhooks: job %s: %s to deliver", job_id, event_type)
        return True

    # -- send: due deliveries, one attempt each -------------------------------------------------------

    def send_due(self) -> None:
        """Claim as many due deliveries as there are free threads, and attempt each on the pool."""
        free = 0
        while self.in_flight.acquire(blocking=False):
            free += 1
        claims = claim_due(self.redis, free, self.settings.webhook_max_attempts) if free else []
        for _ in range(free - len(claims)):
            self.in_flight.release()
        for claim in claims:
            self.pool.submit(self._attempt, claim)

    def _attempt(self, claim: Claim) -> None:
        try:
            result = self.deliver(claim)
            max_attempts = self.settings.webhook_max_attempts
            retry_at = None
            if not result.ok and claim.attempts < max_attempts:
                retry_at = time.time() + retry_delay_s(claim.attempts, self.settings.webhook_backoff_s)
            record_attempt(
                self.redis,
                claim,
                delivered=result.ok,
                status=result.status,
                error=result.error,
                next_attempt_at=retry_at,
            )
            outcome = "delivered" if result.ok else "retried" if retry_at else "failed"
            if self.metrics is not None:
                self.metrics.webhook_attempts.labels(claim.event.value, outcome).inc()
            answer = result.status if result.status is not None else result.error
            level = logging.INFO if result.ok else logging.WARNING
            log.log(
                level,
                "webhooks: %s attempt %d/%d: %s (%s)",
                claim.id,
                claim.attempts,
                max_attempts,
                outcome,
                answer,
            )
        except Exception:  # the lease runs out and another pass retries it
            log.exception("webhooks: attempt of %s failed", claim.id)
        finally:
            self.in_flight.release()

    def deliver(self, claim: Claim) -> DeliveryResult:
        """One attempt: the URL checked again (resolved once), signed, POSTed to the checked address."""
        secret = signing_secret(self.redis, self.settings, claim.owner)
        if secret is None:
            whose = f"API key {claim.owner!r} is revoked" if claim.owner else "DIT_WEBHOOK_SECRET is unset"
            return DeliveryResult(error=f"no signing secret: {whose}")
        try:
            target = check_url(claim.url, self.allow, self.resolver)
        except WebhookURLRefused as exc:
            return DeliveryResult(error=f"refused: {exc}")
        headers = signed_headers(secret, claim.id, int(time.time()), claim.body)
        return post(target, claim.body, headers, connect=self.connect, tls=self.tls)
