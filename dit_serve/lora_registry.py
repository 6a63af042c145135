"""The LoRA registry in Redis: each served model's adapters, and the layers its workers can adapt.

`dit:loras:<model>`: a hash, adapter name -> JSON `LoraInfo` (dit_serve/loras.py). `dit:lora-targets:<model>`:
the model's linear layers, module path -> [in, out] features, published by its workers when they start,
so that the API can check an adapter fits the model without loading it.
"""

import json

from redis import Redis

from dit_serve.jobs import KEY_PREFIX
from dit_serve.loras import AdapterFile, LoraInfo, info_for
from dit_serve.storage import Storage


def registry_key(model: str) -> str:
    return f"{KEY_PREFIX}:loras:{model}"


def targets_key(model: str) -> str:
    """Where workers publish a model's adaptable layers: module path -> [in, out] features (JSON)."""
    return f"{KEY_PREFIX}:lora-targets:{model}"


def register(redis: Redis, info: LoraInfo) -> None:
    redis.hset(registry_key(info.model), info.name, info.model_dump_json())


def store_and_register(
    redis: Redis, storage: Storage, model: str, name: str, adapter: AdapterFile, source: str
) -> LoraInfo:
    """Put a checked adapter's weights in the shared storage, then add it to the registry."""
    info = store_adapter(storage, model, name, adapter, source)
    register(redis, info)
    return info


def store_adapter(storage: Storage, model: str, name: str, adapter: AdapterFile, source: str) -> LoraInfo:
    """Put an adapter's weights where workers load them from; returns its entry, not registered (the
    evaluation, the benchmark and tests apply adapters without a registry)."""
    info = info_for(model, name, adapter, source)
    storage.put(info.key, adapter.weights, "application/octet-stream")
    return info


def unregister(redis: Redis, model: str, name: str) -> LoraInfo | None:
    """Remove an adapter from the registry; returns what it was (None: it was not registered)."""
    raw = redis.hget(registry_key(model), name)
    if raw is None:
        return None
    redis.hdel(registry_key(model), name)
    return LoraInfo.model_validate_json(raw)


def registered(redis: Redis, model: str) -> dict[str, LoraInfo]:
    """A model's adapters by name."""
    raw: dict[bytes, bytes] = redis.hgetall(registry_key(model))  # type: ignore[assignment]
    return {name.decode(): LoraInfo.model_validate_json(value) for name, value in sorted(raw.items())}


def registered_all(redis: Redis, models: list[str]) -> dict[str, list[LoraInfo]]:
    """The adapters of each of these models, in one round trip."""
    with redis.pipeline() as pipe:
        for model in models:
            pipe.hgetall(registry_key(model))
        found = pipe.execute() if models else []
    return {
        model: [LoraInfo.model_validate_json(value) for _name, value in sorted(raw.items())]
        for model, raw in zip(models, found, strict=True)
    }


def publish_targets(redis: Redis, model: str, targets: dict[str, tuple[int, int]]) -> None:
    redis.set(targets_key(model), json.dumps(targets, sort_keys=True))


def read_targets(redis: Redis, model: str) -> dict[str, tuple[int, int]] | None:
    raw = redis.get(targets_key(model))
    if raw is None:
        return None
    return {module: (shape[0], shape[1]) for module, shape in json.loads(raw).items()}
