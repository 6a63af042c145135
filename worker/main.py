"""`dit-serve worker`: load the models once, then serve their queues until SIGTERM."""

import logging
import os
import signal
import socket
import uuid

import torch
from redis import Redis

from dit_serve.config import Batching, Device, Dtype, Settings
from dit_serve.loras import PEFT_WEIGHTS, parse_lora_flag
from dit_serve.storage import Storage, storage_from_settings
from models.bundled import BUNDLED_LORAS, IMAGE_MODEL_DIR, IMAGE_MODEL_NAME, VIDEO_MODEL_DIR, VIDEO_MODEL_NAME
from models.loading import LoadedModel, ModelLoadError, load_model
from models.sources import resolve_source
from worker.acceleration import accelerate
from worker.lora import adapter_bank, publish_layers, register_at_start
from worker.metrics import WorkerMetrics
from worker.runner import Worker, WorkerConfig

log = logging.getLogger(__name__)
MB = 1024 * 1024

# Well above the worker's longest blocking call (a 1 s wait on the wake list); redis-py's default is 5 s.
REDIS_SOCKET_TIMEOUT_S = 10.0


def resolve_device(device: Device) -> torch.device:
    if device is Device.CUDA and not torch.cuda.is_available():
        raise SystemExit(
            "--device cuda was asked for but torch sees no CUDA device; use --device cpu or auto"
        )
    if device is Device.AUTO:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device.value)


TORCH_DTYPES = {Dtype.FP32: torch.float32, Dtype.FP16: torch.float16, Dtype.BF16: torch.bfloat16}


def parse_model_sources(entries: list[str]) -> dict[str, str]:
    """NAME=SOURCE entries (from --model or DIT_MODELS) to a name -> source map (directory or hub id)."""
    sources: dict[str, str] = {}
    for entry in entries:
        name, sep, source = entry.partition("=")
        if not sep or not name or not source:
            raise SystemExit(
                f"--model {entry!r}: expected NAME=SOURCE, "
                "e.g. xl=/models/DiT-XL-2-256 or xl=facebook/DiT-XL-2-256"
            )
        if ":" in name or "|" in name:
            raise SystemExit(f"--model {entry!r}: a model name may not contain ':' or '|'")
        sources[name] = source
    return sources


def default_model_sources() -> dict[str, str]:
    """What `dit-serve up` serves when no --model is given: the bundled, trained models (models/bundled)."""
    bundled = {IMAGE_MODEL_NAME: IMAGE_MODEL_DIR, VIDEO_MODEL_NAME: VIDEO_MODEL_DIR}
    for name, path in bundled.items():
        if not (path / "model_index.json").is_file():
            kind = "image" if name == IMAGE_MODEL_NAME else "video"
            raise SystemExit(
                f"bundled model missing at {path}: run `dit-serve train {kind}`, or pass --model"
            )
    return {name: str(path) for name, path in bundled.items()}


def load_models(settings: Settings, device: torch.device) -> dict[str, LoadedModel]:
    """Each model once, on device, in the settings' dtype; a model that cannot load stops the worker."""
    sources = parse_model_sources(settings.models) or default_model_sources()
    dtype = TORCH_DTYPES[settings.dtype]
    try:
        models = {
            name: load_model(name, resolve_source(name, source), device, dtype)
            for name, source in sources.items()
        }
    except ModelLoadError as exc:
        raise SystemExit(str(exc)) from exc
    for model in models.values():
        accelerate(model, settings.compile)
    return models


def set_up_adapters(
    settings: Settings, redis: Redis, storage: Storage, models: dict[str, LoadedModel]
) -> None:
    """Each model's LoRA bank with the memory cap, its layers published, and --lora's adapters registered
    (with the bundled models, the shipped ones too: models/bundled/loras)."""
    for name, model in models.items():
        adapter_bank(model.transformer, storage, settings.lora_memory_mb * MB)
        publish_layers(redis, name, model.transformer)
    entries = list(settings.lora)
    if not settings.models:  # the bundled models, and the adapters shipped with them
        entries += [
            f"{model}:{name}={path}"
            for model, adapters in BUNDLED_LORAS.items()
            for name, path in adapters.items()
            if (path / PEFT_WEIGHTS).is_file()
        ]
    for entry in entries:
        model_name, adapter_name, source = parse_lora_flag(entry)
        if model_name not in models:
            raise SystemExit(
                f"--lora {entry}: this worker serves no model {model_name!r} ({', '.join(models)})"
            )
        register_at_start(redis, storage, model_name, models[model_name].transformer, adapter_name, source)


def run_worker(settings: Settings) -> None:
    """Start a worker process and block until it is told to stop."""
    if not settings.redis_url:
        raise SystemExit(
            "dit-serve worker needs --redis-url (or REDIS_URL); `dit-serve up` starts one for you"
        )
    device = resolve_device(settings.device)
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True
    torch.set_grad_enabled(False)
    # Metrics first: a taken port stops the worker before minutes of model loading.
    metrics = WorkerMetrics(device, settings.batching.value)
    if settings.metrics_port:
        metrics.serve(settings.metrics_host, settings.metrics_port)
        log.info("worker metrics on http://%s:%d/metrics", settings.metrics_host, settings.metrics_port)
    models = load_models(settings, device)
    for model in models.values():
        metrics.add_model(model)
    storage = storage_from_settings(settings)
    storage.check()
    name = settings.worker_name or f"{socket.gethostname()}.{os.getpid()}.{uuid.uuid4().hex[:6]}"
    config = WorkerConfig(
        name=name,
        max_batch=settings.max_batch,
        max_wait_ms=settings.max_wait_ms,
        heartbeat_interval_s=settings.heartbeat_interval_s,
        heartbeat_ttl_s=settings.heartbeat_ttl_s,
        reap_interval_s=settings.reap_interval_s,
        job_ttl_s=settings.job_ttl_s,
        orphan_timeout_s=settings.orphan_timeout_s,
        priority_aging_s=settings.priority_aging_s,
        continuous=settings.batching is Batching.CONTINUOUS,
        job_timeout_s=settings.job_timeout_s,
        max_batch_cost=settings.max_batch_cost,
        batch_gap_ms=settings.batch_gap_ms,
        max_fill_ms=settings.max_fill_ms,
        interleave=settings.interleave,
    )
    redis = Redis.from_url(settings.redis_url, socket_timeout=REDIS_SOCKET_TIMEOUT_S)
    set_up_adapters(settings, redis, storage, models)
    worker = Worker(config, redis, models, storage, metrics)

    def stop(signum: int, _frame: object) -> None:
        log.info("signal %d: finishing the current batch, then stopping", signum)
        worker.stopping.set()

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    with torch.inference_mode():
        worker.serve_forever()
