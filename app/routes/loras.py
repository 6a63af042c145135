"""LoRA adapters: GET /v1/loras lists them; POST /v1/loras and DELETE /v1/loras/{model}/{name} (admin
keys) register and remove them at run time, with no restart (dit_serve/loras.py, worker/lora.py).

Registering reads the adapter's files on the API's host, checks them against the model's layers (as its
workers published them), puts the weights in the shared storage, and adds the adapter to the registry;
workers load it from storage on first use. Removing it takes it out of the registry and storage; queued
jobs that named it fail `lora_unavailable`, and workers drop it from memory as their LRU turns over.
"""

from pathlib import Path

from fastapi import APIRouter, Depends, Response

from app.auth import Caller, CallerDep
from app.deps import RedisDep, StorageDep, require_json
from app.errors import Conflict, Forbidden, InvalidRequest, NotFound, ServiceUnavailable
from app.openapi import (
    ADMIN_ONLY,
    BODY_TOO_LARGE,
    INVALID_LORA,
    LORA_EXISTS,
    LORA_NOT_FOUND,
    NO_LAYERS,
    REDIS_UNAVAILABLE,
    UNAUTHORIZED,
    UNSUPPORTED_MEDIA_TYPE,
    error_responses,
)
from dit_serve.catalog import served_models
from dit_serve.lora_registry import read_targets, registered, registered_all, store_and_register, unregister
from dit_serve.loras import LoraError, LoraInfo, check_fits, read_adapter, shown_to
from dit_serve.schemas import LoraList, LoraRegistration

router = APIRouter(prefix="/v1/loras", tags=["loras"])


def _admin(caller: Caller) -> None:
    if not caller.admin:
        raise Forbidden("registering and removing LoRA adapters needs an admin API key", "admin_only")


@router.get("", responses=error_responses(UNAUTHORIZED, REDIS_UNAVAILABLE))
def list_loras(redis: RedisDep, caller: CallerDep) -> LoraList:
    """Every served model's adapters, by model then name."""
    by_model = registered_all(redis, sorted(served_models(redis)))
    return LoraList(
        data=[shown_to(info, caller.admin) for model in sorted(by_model) for info in by_model[model]]
    )


@router.post(
    "",
    status_code=201,
    responses=error_responses(
        UNAUTHORIZED,
        ADMIN_ONLY,
        BODY_TOO_LARGE,
        UNSUPPORTED_MEDIA_TYPE,
        INVALID_LORA,
        LORA_EXISTS,
        NO_LAYERS,
        REDIS_UNAVAILABLE,
    ),
    dependencies=[Depends(require_json)],
)
def register_lora(
    body: LoraRegistration, redis: RedisDep, storage: StorageDep, caller: CallerDep, response: Response
) -> LoraInfo:
    """Register an adapter of a served model; 200 with the existing entry when the same weights are
    registered under that name already."""
    _admin(caller)
    if body.model not in served_models(redis):
        raise InvalidRequest(f"no live worker serves model {body.model!r} (GET /v1/models)", "unknown_model")
    targets = read_targets(redis, body.model)
    if targets is None:
        raise ServiceUnavailable(
            f"no worker of model {body.model} has published its layers; restart one of its workers",
            "no_worker",
        )
    try:
        adapter = read_adapter(Path(body.source))
    except LoraError as exc:
        raise InvalidRequest(str(exc), "invalid_lora") from None
    try:
        check_fits(adapter, targets, body.model)
    except LoraError as exc:
        raise InvalidRequest(str(exc), "lora_does_not_fit") from None
    existing = registered(redis, body.model).get(body.name)
    if existing is not None:
        if existing.digest != adapter.digest:
            raise Conflict(
                f"model {body.model} has an adapter {body.name!r} with other weights; delete it first "
                f"(DELETE /v1/loras/{body.model}/{body.name})",
                "lora_exists",
            )
        response.status_code = 200
        return existing
    return store_and_register(redis, storage, body.model, body.name, adapter, body.source)


@router.delete(
    "/{model}/{name}", responses=error_responses(UNAUTHORIZED, ADMIN_ONLY, LORA_NOT_FOUND, REDIS_UNAVAILABLE)
)
def delete_lora(model: str, name: str, redis: RedisDep, storage: StorageDep, caller: CallerDep) -> LoraInfo:
    """Remove an adapter: from the registry, then its weights from storage."""
    _admin(caller)
    info = unregister(redis, model, name)
    if info is None:
        raise NotFound(f"model {model} has no LoRA adapter {name!r} (GET /v1/loras)", "lora_not_found")
    storage.delete(info.key)
    return info
