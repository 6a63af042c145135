"""Typed settings: one `Settings` per process, built by `get_settings()`, every field an env variable."""

from enum import StrEnum
from pathlib import Path

from pydantic import AliasChoices, Field, SecretStr, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from dit_serve.caching import CacheChoice, parse_policy
from dit_serve.idempotency import IDEMPOTENCY_TTL_S
from dit_serve.metrics import DEFAULT_WORKER_METRICS_PORT
from dit_serve.scheduling import DEFAULT_AGING_S
from dit_serve.webhook_guard import AllowList
from dit_serve.webhook_signing import secret_key
from dit_serve.webhooks import DEFAULT_BACKOFF_S, DEFAULT_MAX_ATTEMPTS

ENV_PREFIX = "DIT_"
# How long the reference job (one 512x512 image of 50 steps, worker/watchdog.py) may sample before its
# worker counts as hung; a batch's ceiling scales with its cost. Generous: it catches hangs, not slowness.
DEFAULT_JOB_TIMEOUT_S = 600.0
# 16 rows of DiT-XL/2 at 512x512 with CFG (2 forward rows each). Rows bind first for the bundled models
# (their batches are as before: 16 images, or 16 videos of 16 frames at 32x32); PixArt-Σ at 1024x1024
# with CFG gets 4 rows; an 81-frame 480x832 Wan video (64.7 M) runs alone.
DEFAULT_MAX_BATCH_COST = 16 * 512 * 512 * 2
# A burst of posts reaches the queue at gaps of up to 81 ms on 2 busy CPU cores (docs/benchmarks.md,
# "Bursts"); a batch waits at most half a second for one to arrive.
DEFAULT_BATCH_GAP_MS = 100
DEFAULT_MAX_FILL_MS = 500


class Device(StrEnum):
    AUTO = "auto"
    CPU = "cpu"
    CUDA = "cuda"


class Dtype(StrEnum):
    FP32 = "fp32"
    FP16 = "fp16"
    BF16 = "bf16"


class CompileMode(StrEnum):
    """torch.compile of each model's repeated transformer blocks (regional compilation)."""

    NONE = "none"  # eager PyTorch: the safe default, no compile time
    DEFAULT = "default"  # Inductor's fused kernels
    REDUCE_OVERHEAD = "reduce-overhead"  # ... replayed as CUDA graphs (fewer kernel launches)
    MAX_AUTOTUNE = "max-autotune-no-cudagraphs"  # ... with autotuned matmuls (long compile)


class Batching(StrEnum):
    STATIC = "static"  # a batch runs start to end; later jobs wait for the next one
    CONTINUOUS = "continuous"  # jobs join a running batch at step boundaries (DDIM models)


class StorageBackend(StrEnum):
    LOCAL = "local"
    S3 = "s3"


class AuthMode(StrEnum):
    ON = "on"  # every /v1 route needs `Authorization: Bearer <key>` (keys: `dit-serve keys create`)
    OFF = "off"  # no keys; every client sees every job


LOOPBACK_HOSTS = frozenset({"127.0.0.1", "::1", "localhost"})


def is_loopback(host: str) -> bool:
    return host in LOOPBACK_HOSTS


def auth_default(command: str, host: str) -> AuthMode:
    """Auth when neither --auth nor DIT_AUTH says: off only for `dit-serve up` on a loopback address."""
    return AuthMode.OFF if command == "up" and is_loopback(host) else AuthMode.ON


class Settings(BaseSettings):
    """Configuration for the API, the workers and `dit-serve up`; env names are DIT_<FIELD>."""

    model_config = SettingsConfigDict(env_prefix=ENV_PREFIX, extra="ignore")

    host: str = "127.0.0.1"
    # None: the command's default (see auth_default); the API itself treats None as on.
    auth: AuthMode | None = None
    port: int = Field(8000, ge=0, le=65535)
    # REDIS_URL is the name every Redis tool knows; DIT_REDIS_URL also works.
    redis_url: str | None = Field(None, validation_alias=AliasChoices("REDIS_URL", "DIT_REDIS_URL"))
    data_dir: Path = Path("./data")
    output_dir: Path = Path("./data/outputs")
    storage: StorageBackend = StorageBackend.LOCAL
    s3_bucket: str | None = None
    s3_prefix: str = ""
    s3_endpoint_url: str | None = None
    s3_region: str | None = None

    # Models served by a worker, as NAME=SOURCE: a diffusers-format directory or a Hugging Face Hub id
    # (downloaded once, when the network allows). Empty: the bundled models.
    models: list[str] = Field(default_factory=list)
    default_model: str | None = None
    # Step caching a request gets when it names none, as MODEL=POLICY (dit_serve/caching.py's syntax:
    # none, auto, first_block, interval, or name,knob=value,...). A model not named: no caching.
    cache: list[str] = Field(default_factory=list)
    # LoRA adapters a worker registers at start, as MODEL:NAME=SOURCE (dit_serve/loras.py), and the memory
    # its loaded adapters may take per model (least recently used ones are unloaded past it).
    lora: list[str] = Field(default_factory=list)
    lora_memory_mb: int = Field(1024, ge=1)
    device: Device = Device.AUTO
    dtype: Dtype = Dtype.FP32  # weights and sampling dtype for every model of a worker
    compile: CompileMode = CompileMode.NONE
    max_batch: int = Field(16, ge=1, le=1024)
    # Cost units of one batch: the sum over its rows of pixels x frames x (2 with CFG, else 1)
    # (worker/batching.py). The default is 16 rows of the bundled 32x32 image model with CFG.
    max_batch_cost: int = Field(DEFAULT_MAX_BATCH_COST, ge=1)
    # Static batching's fill window (worker/fill_window.py): a lone job waits max_wait_ms for partners;
    # each job that joins keeps the window open batch_gap_ms more, up to max_fill_ms after the first.
    max_wait_ms: int = Field(20, ge=0, le=60_000)
    batch_gap_ms: int = Field(DEFAULT_BATCH_GAP_MS, ge=0, le=60_000)
    max_fill_ms: int = Field(DEFAULT_MAX_FILL_MS, ge=0, le=60_000)
    batching: Batching = Batching.STATIC
    # A long run pauses at a step boundary while a shorter batch of another of the worker's models runs
    # (worker/interleave.py), so that images do not wait behind a whole video.
    interleave: bool = True
    worker_name: str | None = None
    # A worker serves its Prometheus metrics on metrics_host:metrics_port (0: not at all); the API's
    # /metrics also carries the metrics found at worker_metrics_url (`dit-serve up` sets it).
    metrics_host: str = "127.0.0.1"
    metrics_port: int = Field(DEFAULT_WORKER_METRICS_PORT, ge=0, le=65535)
    worker_metrics_url: str | None = None

    # Crash safety: a held job whose heartbeat is older than heartbeat_ttl_s goes back to the queue, or
    # fails with worker_lost (dit_serve/reaping.py: a death while the job ran alone spends one of its
    # job_retries). ttl + reap interval must stay under 60 s.
    heartbeat_interval_s: float = Field(5.0, gt=0)
    heartbeat_ttl_s: int = Field(30, ge=2)
    reap_interval_s: float = Field(5.0, gt=0)
    job_retries: int = Field(2, ge=0, le=10)
    # Hung work: a batch sampling longer than this × its cost over the reference job's (at least this)
    # is given up, and its worker exits for its supervisor to restart (worker/watchdog.py).
    job_timeout_s: float = Field(DEFAULT_JOB_TIMEOUT_S, gt=0)
    # Admission: at most this many jobs wait in one model's queue (0: no cap); more get 429 queue_full.
    max_queue_depth: int = Field(1000, ge=0)
    # A low-priority job that has waited this long is taken as a normal one (aging; 0: never).
    priority_aging_s: float = Field(DEFAULT_AGING_S, ge=0)
    # A queued job whose model has had no live worker for this long fails with no_worker.
    orphan_timeout_s: float = Field(300.0, gt=0)
    # Retention (dit_serve/retention.py): an ended job, its records and its outputs are deleted this
    # long after it ended (under a minute only makes sense in tests)...
    job_ttl_s: int = Field(7 * 24 * 3600, ge=1)
    # ... then its id answers 410 job_expired for this long (0: 404 at once), then 404 job_not_found.
    expired_grace_s: int = Field(7 * 24 * 3600, ge=0)
    # An Idempotency-Key names its job for this long after the first request that used it.
    idempotency_ttl_s: int = Field(IDEMPOTENCY_TTL_S, ge=1)
    # False: the sweep deletes records only, and outputs are left to a bucket lifecycle rule.
    delete_outputs: bool = True
    # POST /v1/images/generations (OpenAI's images API) waits this long for its job, then answers a
    # 504 naming the job, which the client can poll at /v1/jobs/{id}.
    openai_wait_s: float = Field(300.0, gt=0, le=3600)
    # The API refuses a request body larger than this (413 body_too_large) without reading it all.
    max_body_bytes: int = Field(64 * 1024, ge=1)
    log_level: str = "info"

    # Webhooks (README, "Webhooks"): hosts, IPs and CIDRs exempt from the SSRF rules (comma-separated;
    # they may use http), the signing secret of jobs sent with auth off (keys have their own), and the
    # retry schedule: waits of backoff * 4^(k-1) (at most 30 min, plus up to 50%) between attempts.
    webhook_allow: str = ""
    webhook_secret: SecretStr | None = None
    webhook_backoff_s: float = Field(DEFAULT_BACKOFF_S, gt=0)
    webhook_max_attempts: int = Field(DEFAULT_MAX_ATTEMPTS, ge=1, le=20)

    @field_validator("cache")
    @classmethod
    def _cache_defaults_parse(cls, value: list[str]) -> list[str]:
        for entry in value:
            _cache_entry(entry)
        return value

    @property
    def cache_defaults(self) -> dict[str, CacheChoice]:
        """The step-caching default per model name."""
        return dict(_cache_entry(entry) for entry in self.cache)

    @field_validator("webhook_allow")
    @classmethod
    def _allow_list_parses(cls, value: str) -> str:
        AllowList.parse(value)
        return value

    @field_validator("webhook_secret")
    @classmethod
    def _secret_is_standard(cls, value: SecretStr | None) -> SecretStr | None:
        if value is not None:
            try:
                secret_key(value.get_secret_value())
            except ValueError as exc:
                raise ValueError(f"DIT_WEBHOOK_SECRET: {exc}") from None
        return value

    @property
    def webhook_allow_list(self) -> AllowList:
        return AllowList.parse(self.webhook_allow)


def get_settings(**overrides: object) -> Settings:
    """Build the settings from the environment, with explicit overrides (CLI flags) taking precedence."""
    return Settings(**{key: value for key, value in overrides.items() if value is not None})  # type: ignore[arg-type]


def _cache_entry(entry: str) -> tuple[str, CacheChoice]:
    model, sep, policy = entry.partition("=")
    if not sep or not model.strip():
        raise ValueError(f"cache default {entry!r}: write MODEL=POLICY, e.g. dit-shapes-image=auto")
    return model.strip(), parse_policy(policy)
