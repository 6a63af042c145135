"""The model catalog: what each live worker serves, published in Redis for the API to read."""

import json
import time

from pydantic import BaseModel
from redis import Redis

from dit_serve.jobs import CLASS_CONDITIONING, KEY_PREFIX

WORKERS_KEY = f"{KEY_PREFIX}:workers"  # sorted set: worker name -> unix time its registration expires


def worker_key(name: str) -> str:
    return f"{KEY_PREFIX}:worker:{name}"


class ModelDefaults(BaseModel):
    num_inference_steps: int
    guidance_scale: float
    num_frames: int | None


class ModelSpec(BaseModel):
    """What a client may ask of one model; built by the worker from the loaded checkpoint."""

    name: str
    kind: str  # "image" | "video"
    family: str
    conditioning: str = (
        CLASS_CONDITIONING  # "class": prompts name labels; "text": free text (and negative_prompt)
    )
    sizes: list[str]
    default_size: str
    size_multiple: int | None = None  # when set, any WxH with sides multiples of it ...
    max_pixels: int | None = None  # ... and W*H at most this is accepted besides `sizes`
    defaults: ModelDefaults
    labels: list[str] | None
    max_frames: int | None = None
    frames_multiple: int = 1  # num_frames - 1 must be a multiple of this


def publish_worker(redis: Redis, name: str, models: list[ModelSpec], ttl_s: float) -> None:
    """Register (or refresh) a live worker and the models it serves; it vanishes ttl_s after the last call."""
    payload = json.dumps([spec.model_dump() for spec in models])
    with redis.pipeline() as pipe:
        pipe.set(worker_key(name), payload, px=int(ttl_s * 1000))
        pipe.zadd(WORKERS_KEY, {name: time.time() + ttl_s})
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
    """Every model some live worker serves, by name (the first worker's description wins)."""
    names = live_workers(redis)
    payloads = redis.mget([worker_key(name) for name in names]) if names else []
    models: dict[str, ModelSpec] = {}
    for payload in payloads:
        for spec in json.loads(payload) if payload else []:
            models.setdefault(spec["name"], ModelSpec.model_validate(spec))
    return models
