"""Who is calling: the API key of `Authorization: Bearer <key>`, checked against the key store.

Keys are made with `dit-serve keys create`. With `--auth off` every caller is an anonymous admin.
"""

from dataclasses import dataclass
from typing import Annotated

from fastapi import Depends, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from app.deps import RedisDep
from app.errors import Unauthorized
from dit_serve.config import AuthMode
from dit_serve.contract import Priority
from dit_serve.keys import ApiKey, authenticate

# auto_error=False: a missing or malformed header reaches us, so it gets our own 401 error shape.
bearer = HTTPBearer(
    auto_error=False,
    scheme_name="APIKey",
    description="An API key from `dit-serve keys create NAME`, sent as `Authorization: Bearer <key>`.",
)


@dataclass(frozen=True)
class Caller:
    """The key a request came with (name None: auth is off), whether it may see every job, and its
    limits (none with auth off)."""

    name: str | None
    admin: bool
    key: ApiKey | None = None

    @property
    def priority_cap(self) -> Priority:
        return self.key.priority_cap if self.key is not None else Priority.HIGH

    def sees(self, owner: str | None) -> bool:
        """Whether this caller may see a job created by key `owner`."""
        return self.admin or (self.name is not None and owner == self.name)

    @property
    def listed_owner(self) -> str | None:
        """Whose jobs `GET /v1/jobs` lists: this key's own, or everyone's (None) for an admin."""
        return None if self.admin else self.name


ANONYMOUS = Caller(name=None, admin=True)
CHALLENGE = "send an API key as `Authorization: Bearer <key>` (create one with `dit-serve keys create NAME`)"


def get_caller(
    request: Request,
    redis: RedisDep,
    credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(bearer)],
) -> Caller:
    """The caller of this request; 401 `unauthorized` for a missing, malformed, unknown or revoked key."""
    if request.app.state.settings.auth == AuthMode.OFF:
        return ANONYMOUS
    if credentials is None or not credentials.credentials:
        raise Unauthorized(f"no API key: {CHALLENGE}")
    key = authenticate(redis, credentials.credentials)
    if key is None:
        raise Unauthorized("the API key is not valid (unknown or revoked)")
    return Caller(name=key.name, admin=key.admin, key=key)


CallerDep = Annotated[Caller, Depends(get_caller)]
