"""POST /v1/images and POST /v1/videos: validate, normalise, enqueue, answer 202 with the job.

The caller's key is checked first (a request without a valid key learns nothing else), and its name
is stored as the job's owner.
"""

import math
import time

from fastapi import APIRouter, Depends, Request, Response, status
from redis import Redis

from app.auth import Caller, CallerDep, get_caller
from app.deps import RedisDep, SettingsDep, require_json
from app.errors import Conflict, Gone, InvalidRequest, NotFound, TooManyRequests
from app.openapi import SUBMISSION_PARAMETERS, SUBMISSION_RESPONSES
from app.submission import check_webhook, choose_model, new_job_id, normalise
from app.views import job_body
from app.webhook_sender import signing_secret
from dit_serve.admission import QuotaExceeded, RateLimited, take_token
from dit_serve.catalog import served_models
from dit_serve.config import Settings
from dit_serve.contract import JobKind
from dit_serve.idempotency import IDEMPOTENCY_HEADER, VALID_KEY, Claim, ClaimOutcome, claim, fingerprint
from dit_serve.idempotency import release as release_claim
from dit_serve.jobs import JobRecord
from dit_serve.queueing import QueueFullError, completions_per_s, enqueue_job
from dit_serve.schemas import ImageRequest, JobBody, VideoRequest

router = APIRouter(prefix="/v1", tags=["generation"])
CHECKS = [Depends(get_caller), Depends(require_json)]  # in this order: the key before anything else


REPLAY_WAIT_S = 5.0  # how long a duplicate waits for the first request to finish creating the job
REPLAY_POLL_S = 0.02
DRAIN_WINDOW_S = 60.0  # Retry-After of queue_full comes from the completions of the last minute
UNKNOWN_DRAIN_RETRY_S = 5  # ... or this, when nothing completed in that minute
MAX_RETRY_AFTER_S = 60


def submit(
    request: Request,
    body: ImageRequest | VideoRequest,
    kind: JobKind,
    redis: Redis,
    settings: Settings,
    response: Response,
    caller: Caller,
) -> JobBody:
    """Check the caller's rate, normalise `body` for its model, and queue it (or find the job an
    identical request with the same Idempotency-Key made); the job object, `Location` set."""
    key = caller.key
    if key is not None and key.rate_per_min is not None:
        _within_rate(redis, key.name, key.rate_per_min)
    spec = choose_model(body.model, kind, served_models(redis), settings.default_model)
    job = normalise(body, kind, spec, settings.cache_defaults)
    job = job.model_copy(update={"priority": job.priority.capped(caller.priority_cap)})
    if job.webhook_url is not None:
        secret = signing_secret(redis, settings, caller.name)
        check_webhook(job, secret, settings.webhook_allow_list, caller.name)
    job_id, record = new_job_id(), JobRecord.new(job, owner=caller.name)
    idempotency_key = request.headers.get(IDEMPOTENCY_HEADER)
    scope = caller.name or ""  # keys are per API key ("" with auth off)
    if idempotency_key is not None:
        claimed = _claim(redis, scope, idempotency_key, request.url.path, body, job_id, settings)
        if claimed.outcome is not ClaimOutcome.NEW:
            response.headers["Location"] = f"/v1/jobs/{claimed.job_id}"
            response.headers["Idempotent-Replayed"] = "true"
            return _replayed(redis, claimed.job_id)
    try:
        enqueue_job(
            redis,
            job_id,
            record,
            retries=settings.job_retries,
            ttl_s=settings.job_ttl_s,
            max_depth=settings.max_queue_depth,
            max_live=key.max_queued if key is not None else None,
            aging_s=settings.priority_aging_s,
        )
    except Exception as exc:
        if idempotency_key is not None:
            release_claim(redis, scope, idempotency_key)  # a retry must be able to create the job
        if isinstance(exc, QueueFullError):
            raise _queue_full(redis, spec.name, settings) from exc
        if isinstance(exc, QuotaExceeded):
            raise _quota_exceeded(redis, spec.name, exc.live, settings) from exc
        raise
    request.app.state.metrics.accepted.labels(kind.value, spec.name).inc()
    response.headers["Location"] = f"/v1/jobs/{job_id}"
    return job_body(redis, job_id)


def _within_rate(redis: Redis, name: str, rate_per_min: int) -> None:
    """Spend one of the key's submissions; 429 rate_limited, with when the next one is there."""
    try:
        take_token(redis, name, rate_per_min)
    except RateLimited as exc:
        raise TooManyRequests(
            f"API key {name!r} may submit {rate_per_min} jobs per minute; retry after the Retry-After "
            "seconds",
            "rate_limited",
            _clamped(math.ceil(exc.retry_after_s)),
        ) from exc


def _drain_retry_after(redis: Redis, model: str, settings: Settings) -> int:
    """Seconds until the model's queue has likely moved on by one job, from the last minute's rate."""
    rate = completions_per_s(redis, model, settings.job_ttl_s, DRAIN_WINDOW_S)
    return _clamped(math.ceil(1 / rate) if rate > 0 else UNKNOWN_DRAIN_RETRY_S)


def _clamped(retry_after_s: int) -> int:
    return min(max(retry_after_s, 1), MAX_RETRY_AFTER_S)


def _queue_full(redis: Redis, model: str, settings: Settings) -> TooManyRequests:
    """429 queue_full, with Retry-After from how fast the model's queue has been draining."""
    return TooManyRequests(
        f"the queue of model {model} is full ({settings.max_queue_depth} jobs waiting); retry after "
        "the Retry-After seconds, when the queue has drained",
        "queue_full",
        _drain_retry_after(redis, model, settings),
    )


def _quota_exceeded(redis: Redis, model: str, live: int, settings: Settings) -> TooManyRequests:
    """429 quota_exceeded, with Retry-After from how fast the model's jobs have been finishing."""
    return TooManyRequests(
        f"this API key already has {live} jobs queued or running, its quota; retry after the "
        "Retry-After seconds, when one of them has ended (or cancel one)",
        "quota_exceeded",
        _drain_retry_after(redis, model, settings),
    )


def _claim(
    redis: Redis,
    scope: str,
    key: str,
    route: str,
    body: ImageRequest | VideoRequest,
    job_id: str,
    settings: Settings,
) -> Claim:
    """Claim the Idempotency-Key for this request; 409 if it was used with another body."""
    if not VALID_KEY.match(key):
        raise InvalidRequest(
            f"{IDEMPOTENCY_HEADER} must be 1-255 visible ASCII characters", "invalid_idempotency_key"
        )
    request_fingerprint = fingerprint(route, body.model_dump_json(exclude_unset=True))
    claimed = claim(redis, scope, key, request_fingerprint, job_id, settings.idempotency_ttl_s)
    if claimed.outcome is ClaimOutcome.CONFLICT:
        raise Conflict(
            f"{IDEMPOTENCY_HEADER} {key!r} was used with a different request within the last "
            f"{settings.idempotency_ttl_s} s "
            f"(job {claimed.job_id}); use a new key for a new request",
            "idempotency_key_reused",
        )
    return claimed


def _replayed(redis: Redis, job_id: str) -> JobBody:
    """The job an earlier identical request created (it may still be in the middle of being created)."""
    deadline = time.monotonic() + REPLAY_WAIT_S
    while True:
        try:
            return job_body(redis, job_id)
        except Gone as exc:  # possible when DIT_JOB_TTL_S is shorter than DIT_IDEMPOTENCY_TTL_S
            raise Conflict(
                f"{IDEMPOTENCY_HEADER} created job {job_id}, which has expired since; use a new key for "
                "a new request",
                "idempotency_key_reused",
            ) from exc
        except NotFound:
            if time.monotonic() > deadline:
                raise Conflict(
                    f"an identical request with this {IDEMPOTENCY_HEADER} is still being accepted; retry",
                    "idempotency_key_in_use",
                ) from None
            time.sleep(REPLAY_POLL_S)


@router.post(
    "/images",
    status_code=status.HTTP_202_ACCEPTED,
    dependencies=CHECKS,
    responses=SUBMISSION_RESPONSES,
    openapi_extra=SUBMISSION_PARAMETERS,
)
def create_image(
    request: Request,
    body: ImageRequest,
    redis: RedisDep,
    settings: SettingsDep,
    response: Response,
    caller: CallerDep,
) -> JobBody:
    """Queue an image generation job."""
    return submit(request, body, JobKind.IMAGE, redis, settings, response, caller)


@router.post(
    "/videos",
    status_code=status.HTTP_202_ACCEPTED,
    dependencies=CHECKS,
    responses=SUBMISSION_RESPONSES,
    openapi_extra=SUBMISSION_PARAMETERS,
)
def create_video(
    request: Request,
    body: VideoRequest,
    redis: RedisDep,
    settings: SettingsDep,
    response: Response,
    caller: CallerDep,
) -> JobBody:
    """Queue a video generation job."""
    return submit(request, body, JobKind.VIDEO, redis, settings, response, caller)
