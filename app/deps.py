"""Request-scoped dependencies: the Redis client, the settings, the storage, the JSON guard."""

from typing import Annotated

from fastapi import Depends, Request
from redis import Redis

from app.errors import UnsupportedMediaType
from dit_serve.config import Settings
from dit_serve.storage import Storage


def get_redis(request: Request) -> Redis:
    return request.app.state.redis


def get_app_settings(request: Request) -> Settings:
    return request.app.state.settings


def get_storage(request: Request) -> Storage:
    return request.app.state.storage


def require_json(request: Request) -> None:
    content_type = request.headers.get("content-type", "")
    if content_type.split(";")[0].strip().lower() != "application/json":
        raise UnsupportedMediaType(
            f"send the body as JSON with Content-Type: application/json (got {content_type!r})"
        )


RedisDep = Annotated[Redis, Depends(get_redis)]
SettingsDep = Annotated[Settings, Depends(get_app_settings)]
StorageDep = Annotated[Storage, Depends(get_storage)]
