"""The model catalog: what each live worker serves (each model's ModelSpec), published in Redis."""

import json
import time

from redis import Redis

from dit_serve.contract import ModelSpec
from dit_serve.jobs import KEY_PREFIX
from dit_serve.lora_registry import registered_all

WORKERS_KEY = f"{KEY_PREFIX}:workers"  # sorted set: worker name -> unix time its registration expires
SERVED_UNTIL_KEY = f"{KEY_PREFIX}:served-until"  # hash: model -> unix time its last live worker expires


def worker_key(name: str) -> str:
    return f"{KEY_PREFIX}:worker:{name}"


def publish_worker(redis: Redis, name: str, models: list[ModelSpec], ttl_s: float) -> None:
    """Register (or refresh) a live worker and the models it serves; it vanishes ttl_s after the last call."""
    payload = json.dumps([spec.model_dump(mode="json") for spec in models])
    until = time.time() + ttl_s
    with redis.pipeline() as pipe:
        pipe.set(worker_key(name), payload, px=int(ttl_s * 1000))
        pipe.zadd(WORKERS_KEY, {name: until})
        if models:
            pipe.hset(SERVED_UNTIL_KEY, mapping={spec.name: until for spec in models})
        pipe.execute()


def retire_worker(redis: Redis, name: str) -> None:
    with redis.pipeline() as pipe:
        pipe.delete(worker_key(name))
        pipe.zrem(WORKERS_KEY, name)
        pipe.execute()


def live_workers(redis: Redis) -> list[str]:
    now = time.time()
    redis.zremrangebyscore(WORKERS_KEY, "-inf", now)
    names: list[bytes] = redis.zrange(WORKERS_KEY, 0, -1)  # type: ignore[assignment]
    return [name.decode() for name in names]


def served_models(redis: Redis) -> dict[str, ModelSpec]:
    """Every model some live worker serves, by name (the first worker's description wins), with the
    LoRA adapters registered for it (dit_serve/lora_registry.py)."""
    names = live_workers(redis)
    payloads = redis.mget([worker_key(name) for name in names]) if names else []
    models: dict[str, ModelSpec] = {}
    for payload in payloads:
        for spec in json.loads(payload) if payload else []:
            models.setdefault(spec["name"], ModelSpec.model_validate(spec))
    adapters = registered_all(redis, list(models))
    return {name: spec.model_copy(update={"loras": adapters[name]}) for name, spec in models.items()}


def served_until(redis: Redis, model: str) -> float | None:
    """Until when the last live worker serving `model` is (or was) registered; None if none ever was."""
    value = redis.hget(SERVED_UNTIL_KEY, model)
    return float(value) if value else None  # type: ignore[arg-type]
