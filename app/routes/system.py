"""GET /v1/models, /healthz, /readyz, /metrics."""

from fastapi import APIRouter, Request, Response
from fastapi.responses import PlainTextResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from app.auth import CallerDep
from app.deps import RedisDep
from app.errors import ServiceUnavailable
from app.openapi import NO_WORKER, REDIS_UNAVAILABLE, UNAUTHORIZED, error_responses
from dit_serve.catalog import live_workers, served_models
from dit_serve.loras import shown_to
from dit_serve.schemas import ModelList

router = APIRouter(tags=["system"])


@router.get("/v1/models", responses=error_responses(UNAUTHORIZED, REDIS_UNAVAILABLE))
def list_models(redis: RedisDep, caller: CallerDep) -> ModelList:
    """Every model a live worker serves, each described by its ModelSpec as the worker published it,
    with its LoRA adapters."""
    specs = served_models(redis)
    return ModelList(
        data=[
            spec.model_copy(update={"loras": [shown_to(info, caller.admin) for info in spec.loras]})
            for spec in (specs[name] for name in sorted(specs))
        ]
    )


@router.get("/healthz", responses=error_responses())
def healthz() -> dict[str, str]:
    """The process is alive."""
    return {"status": "ok"}


@router.get("/readyz", responses=error_responses(REDIS_UNAVAILABLE, NO_WORKER))
def readyz(redis: RedisDep) -> dict[str, object]:
    """Redis answers and at least one worker is live; 503 otherwise."""
    workers = live_workers(redis)
    if not workers:
        raise ServiceUnavailable("no live worker: start one with `dit-serve worker`", "no_worker")
    return {"status": "ready", "workers": len(workers), "models": sorted(served_models(redis))}


@router.get("/metrics", response_class=PlainTextResponse, responses=error_responses())
def metrics(request: Request) -> Response:
    """Prometheus text exposition."""
    return Response(generate_latest(request.app.state.metrics.registry), media_type=CONTENT_TYPE_LATEST)
