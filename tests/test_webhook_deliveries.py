"""Webhook deliveries on a real Redis, in-process: created once, claimed once, retried on schedule.

The end-to-end tests, with API and worker processes, are in tests/test_webhooks.py.
"""

import threading
import time

import pytest
from redis import Redis

from app.errors import InvalidRequest
from app.submission import check_webhook
from app.webhook_sender import WebhookSender
from dit_serve.config import Settings
from dit_serve.contract import WebhookEvent
from dit_serve.jobs import JobRecord
from dit_serve.keys import authenticate, create_key, list_keys, webhook_secret
from dit_serve.queueing import cancel_job, enqueue_job
from dit_serve.webhook_guard import AllowList
from dit_serve.webhook_signing import new_secret, signature
from dit_serve.webhooks import (
    DUE_KEY,
    WATCHED_KEY,
    DeliveryState,
    claim_due,
    create_delivery,
    end_watch,
    job_deliveries,
    record_attempt,
    retry_delay_s,
    retry_span_s,
    state_key,
    watch_job,
)
from tests.test_contract import MODEL, _request
from tests.webhook_receiver import Answer, receiving

TTL_S = 3600
MAX_ATTEMPTS = 3
URL = "https://hooks.example.com/in"


def _watched(redis: Redis, job_id: str = "j", **events: object) -> None:
    record = JobRecord.new(_request(webhook_url=URL, **events), owner="alice")
    with redis.pipeline() as pipe:
        watch_job(pipe, job_id, record)
        pipe.execute()


def test_a_delivery_is_created_once_however_many_replicas_see_the_change(redis: Redis) -> None:
    _watched(redis)
    assert redis.hgetall(state_key("j")) == {
        b"url": URL.encode(),
        b"events": b"completed",
        b"owner": b"alice",
    }
    assert redis.zrange(WATCHED_KEY, 0, -1) == [b"j"]
    created = [create_delivery(redis, "j", WebhookEvent.COMPLETED, "job.completed", b"{}") for _ in range(3)]
    assert created == ["j:completed", None, None]
    assert redis.zrange(DUE_KEY, 0, -1) == [b"j:completed"]
    end_watch(redis, "j", TTL_S)
    assert redis.zrange(WATCHED_KEY, 0, -1) == [] and 0 < redis.ttl(state_key("j")) <= TTL_S
    assert create_delivery(redis, "j", WebhookEvent.STARTED, "job.started", b"{}") is None  # ended
    assert create_delivery(redis, "gone", WebhookEvent.COMPLETED, "job.completed", b"{}") is None


def test_a_claim_goes_to_one_sender_and_a_dead_senders_claim_comes_back(redis: Redis) -> None:
    _watched(redis)
    create_delivery(redis, "j", WebhookEvent.COMPLETED, "job.completed", b'{"a":1}')
    claims: list[list] = []
    racers = [
        threading.Thread(target=lambda: claims.append(claim_due(redis, 5, MAX_ATTEMPTS, 30)))
        for _ in range(8)
    ]
    for racer in racers:
        racer.start()
    for racer in racers:
        racer.join()
    (claim,) = [claim for batch in claims for claim in batch]
    assert (claim.id, claim.job_id, claim.event, claim.attempts, claim.url, claim.owner, claim.body) == (
        "j:completed",
        "j",
        WebhookEvent.COMPLETED,
        1,
        URL,
        "alice",
        b'{"a":1}',
    )
    assert claim_due(redis, 5, MAX_ATTEMPTS) == []  # leased
    redis.zadd(DUE_KEY, {"j:completed": time.time() - 1})  # the claimer died, and its lease ran out
    (again,) = claim_due(redis, 5, MAX_ATTEMPTS, 0.01)
    assert again.attempts == 2
    time.sleep(0.02)
    assert [c.attempts for c in claim_due(redis, 5, MAX_ATTEMPTS, 0.01)] == [3]
    time.sleep(0.02)
    assert claim_due(redis, 5, MAX_ATTEMPTS) == []  # its last attempt was claimed and never reported
    (delivery,) = job_deliveries(redis, "j")
    assert (delivery.status, delivery.attempts, delivery.next_attempt_at) == (DeliveryState.FAILED, 3, None)
    assert redis.zcard(DUE_KEY) == 0


def test_an_attempt_is_recorded_retried_then_delivered(redis: Redis) -> None:
    _watched(redis)
    create_delivery(redis, "j", WebhookEvent.COMPLETED, "job.completed", b"{}")
    (first,) = claim_due(redis, 5, MAX_ATTEMPTS)
    retry_at = time.time() + 0.1
    record_attempt(redis, first, delivered=False, status=500, error=None, next_attempt_at=retry_at)
    (delivery,) = job_deliveries(redis, "j")
    assert (delivery.status, delivery.attempts, delivery.last_status) == (DeliveryState.PENDING, 1, 500)
    assert delivery.next_attempt_at == pytest.approx(retry_at) and redis.zscore(
        DUE_KEY, "j:completed"
    ) == pytest.approx(retry_at)
    assert claim_due(redis, 5, MAX_ATTEMPTS) == []  # not due yet
    time.sleep(0.12)
    (second,) = claim_due(redis, 5, MAX_ATTEMPTS)
    record_attempt(
        redis, second, delivered=False, status=None, error="no answer within 5 s", next_attempt_at=time.time()
    )
    (third,) = claim_due(redis, 5, MAX_ATTEMPTS)
    record_attempt(redis, third, delivered=True, status=204, error=None, next_attempt_at=None)
    (delivery,) = job_deliveries(redis, "j")
    assert (delivery.status, delivery.attempts, delivery.last_status, delivery.last_error) == (
        DeliveryState.DELIVERED,
        3,
        204,
        None,
    )
    assert delivery.delivered_at and delivery.next_attempt_at is None
    assert redis.zcard(DUE_KEY) == 0 and not redis.hexists(state_key("j"), "completed:body")


def test_progress_is_latest_wins_at_most_every_interval_and_dropped_at_the_end(redis: Redis) -> None:
    _watched(redis, webhook_events=[WebhookEvent.PROGRESS, WebhookEvent.COMPLETED])

    def progress(value: int) -> str | None:
        return create_delivery(redis, "j", WebhookEvent.PROGRESS, "job.progress", b"%d" % value, value, 0.1)

    assert progress(10) == "j:progress:1"
    assert progress(20) is None  # too soon
    time.sleep(0.12)
    assert progress(10) is None  # unchanged
    (in_flight,) = claim_due(redis, 5, MAX_ATTEMPTS)  # the first is being sent when the next is due
    assert progress(30) == "j:progress:2"
    record_attempt(redis, in_flight, delivered=False, status=500, error=None, next_attempt_at=time.time())
    assert redis.zrange(DUE_KEY, 0, -1) == [b"j:progress:2"]  # the replaced one is not retried
    create_delivery(redis, "j", WebhookEvent.COMPLETED, "job.completed", b"{}")
    end_watch(redis, "j", TTL_S)
    progress, completed = job_deliveries(redis, "j")
    assert (progress.id, progress.status, completed.status) == (
        "j:progress:2",
        DeliveryState.SUPERSEDED,
        DeliveryState.PENDING,
    )
    assert redis.zrange(DUE_KEY, 0, -1) == [b"j:completed"]


def test_retries_back_off_four_fold_with_jitter_for_over_an_hour() -> None:
    waits = [retry_delay_s(k, 5.0, lambda: 0.0) for k in range(1, 8)]
    assert waits == [5, 20, 80, 320, 1280, 1800, 1800]
    assert retry_delay_s(3, 5.0, lambda: 1.0) == 120  # up to 50% later
    shortest = sum(waits)  # from the first of 8 attempts to the last, every jitter at 0
    assert shortest > 3600 and retry_span_s(5.0, 8) == pytest.approx(1.5 * shortest)


def test_keys_carry_a_webhook_secret_that_is_never_listed(redis: Redis) -> None:
    key, secret = create_key(redis, "alice")
    signing = webhook_secret(redis, "alice")
    assert signing is not None and signing.startswith("whsec_")
    assert (
        "webhook_secret" not in key.model_dump() and "webhook_secret" not in list_keys(redis)[0].model_dump()
    )
    assert authenticate(redis, secret) == key
    assert webhook_secret(redis, "nobody") is None


def test_a_webhook_is_refused_when_it_cannot_be_signed_or_may_not_be_sent(redis: Redis) -> None:
    job = _request(webhook_url="https://10.0.0.1/in")
    for owner, advice in ((None, "DIT_WEBHOOK_SECRET"), ("old-key", "dit-serve keys create")):
        with pytest.raises(InvalidRequest, match=advice) as refused:
            check_webhook(job, None, AllowList(), owner)
        assert refused.value.code == "no_webhook_secret"
    with pytest.raises(InvalidRequest, match="10.0.0.1 is a private address") as refused:
        check_webhook(job, new_secret(), AllowList(), None)
    assert refused.value.code == "webhook_url_forbidden"
    check_webhook(job, new_secret(), AllowList.parse("10.0.0.0/8"), None)
    with pytest.raises(ValueError, match="webhook_events needs a webhook_url"):
        _request(webhook_events=[WebhookEvent.STARTED])
    with pytest.raises(ValueError, match="twice"):
        _request(webhook_url=URL, webhook_events=[WebhookEvent.STARTED, WebhookEvent.STARTED])


def test_the_sender_delivers_a_canceled_queued_jobs_final_event_signed_after_a_retry(redis: Redis) -> None:
    """The API's sender in-process: the job's state change becomes a delivery, sent to a receiver on
    127.0.0.1 that fails once, retried, and signed with DIT_WEBHOOK_SECRET (auth off)."""
    secret = new_secret()
    settings = Settings(
        redis_url="redis://unused",
        webhook_allow="127.0.0.1",
        webhook_secret=secret,  # type: ignore[arg-type]
        webhook_backoff_s=0.05,
    )
    with receiving(lambda n: Answer(503 if n == 1 else 200)) as hook:
        enqueue_job(redis, "q", JobRecord.new(_request(webhook_url=hook.url())), retries=0, ttl_s=TTL_S)
        assert cancel_job(redis, "q", MODEL, TTL_S) == "canceled"
        sender = WebhookSender(redis, settings)
        deadline = time.monotonic() + 5
        while len(hook.requests()) < 2 and time.monotonic() < deadline:
            sender.scan()
            sender.send_due()
            time.sleep(0.05)
        first, second = hook.requests()
    payload = second.payload
    assert payload["type"] == "job.canceled" and payload["data"]["id"] == "q"
    assert payload["data"]["status"] == "canceled" and "deliveries" not in payload["data"]
    assert (
        first.body == second.body
        and first.headers["webhook-id"] == second.headers["webhook-id"] == "q:completed"
    )
    timestamp = int(second.headers["webhook-timestamp"])
    assert abs(timestamp - time.time()) < 10
    assert second.headers["webhook-signature"] == signature(secret, "q:completed", timestamp, second.body)
    time.sleep(0.1)
    (delivery,) = job_deliveries(redis, "q")
    assert (delivery.status, delivery.attempts, delivery.last_status) == (DeliveryState.DELIVERED, 2, 200)
    assert redis.zcard(WATCHED_KEY) == 0


def test_webhook_settings_are_checked_and_the_secret_reaches_ups_worker_unmasked() -> None:
    from cli.main import _environment

    secret = new_secret()
    settings = Settings(webhook_secret=secret, webhook_allow="hooks.internal,10.0.0.0/8")  # type: ignore[arg-type]
    assert secret not in repr(settings)
    assert _environment(settings)["DIT_WEBHOOK_SECRET"] == secret
    assert settings.webhook_allow_list == AllowList.parse("10.0.0.0/8, hooks.internal")
    with pytest.raises(ValueError, match="DIT_WEBHOOK_SECRET: a webhook secret starts with 'whsec_'"):
        Settings(webhook_secret="hunter2")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="neither a host name"):
        Settings(webhook_allow="10.0.0.0/40")


def test_the_scan_waits_for_a_job_being_queued_and_forgets_one_that_is_gone(redis: Redis) -> None:
    record = JobRecord.new(_request(webhook_url=URL))
    redis.hset("dit:job:queuing", mapping=record.creation_fields())  # type: ignore[arg-type]
    _watched(redis, "queuing")  # written, watched, not yet on its RQ queue
    _watched(redis, "gone")  # watched, its record expired
    WebhookSender(redis, Settings(redis_url="redis://unused")).scan()
    assert redis.zrange(WATCHED_KEY, 0, -1) == [b"queuing"]
    assert redis.exists(state_key("queuing")) and not redis.exists(state_key("gone"))
