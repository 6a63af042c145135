"""API keys: created by `dit-serve keys`, checked by the API, stored in Redis only as SHA-256 hashes.

A key's secret is `dit_` + 43 URL-safe characters (32 random bytes, `secrets.token_urlsafe`), so a
plain SHA-256 is enough: no salt or slow hash is needed against guessing a 256-bit secret (the
reasoning GitHub and Stripe use for their tokens). The secret is shown once, at creation.

Each key also gets a webhook secret (`whsec_...`, dit_serve/webhook_signing.py) that signs the
webhooks of its jobs. The API must be able to sign with it, so it is stored as it is (Redis holds it
like the job data it protects); it too is printed once, at creation, and never listed.

Redis layout:
- `dit:keys`: a hash, key name -> JSON `StoredKey` (the limits, the admin flag, the secret's hash,
  the webhook secret);
- `dit:key-hash:<sha256 hex>`: the name of the key with that hash, to find a key by its secret.
"""

import hashlib
import hmac
import re
import secrets
import time

from pydantic import BaseModel, ConfigDict, Field
from redis import Redis

from dit_serve.contract import Priority
from dit_serve.jobs import KEY_PREFIX
from dit_serve.webhook_signing import new_secret

SECRET_PREFIX = "dit_"  # recognisable in logs and by secret scanners
SECRET_BYTES = 32
KEYS_KEY = f"{KEY_PREFIX}:keys"
NAME_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
PRIVATE_FIELDS = {"key_hash", "webhook_secret"}  # stored, never handed out with the key


class ApiKey(BaseModel):
    """What is known of a key besides its secret: its name, whether it is an admin, and its limits."""

    model_config = ConfigDict(frozen=True)

    name: str
    admin: bool = False
    rate_per_min: int | None = Field(None, ge=1, description="jobs per minute; none: unlimited")
    max_queued: int | None = Field(None, ge=1, description="jobs queued or running at once; none: unlimited")
    max_priority: Priority | None = Field(
        None, description="highest priority its jobs get; none: normal (high for an admin key)"
    )
    created_at: float

    @property
    def priority_cap(self) -> Priority:
        """The highest priority this key's jobs get: a request asking for more is lowered to it."""
        if self.max_priority is not None:
            return self.max_priority
        return Priority.HIGH if self.admin else Priority.NORMAL


class StoredKey(ApiKey):
    """A key as Redis keeps it: with the hash of its secret, never the secret, and its webhook secret."""

    key_hash: str
    webhook_secret: str | None = None  # None for keys made before webhooks

    def public(self) -> ApiKey:
        return ApiKey.model_validate(self.model_dump(exclude=PRIVATE_FIELDS))


class KeyExistsError(ValueError):
    """A key of that name exists already."""


def hash_secret(secret: str) -> str:
    return hashlib.sha256(secret.encode()).hexdigest()


def hash_key(key_hash: str) -> str:
    return f"{KEY_PREFIX}:key-hash:{key_hash}"


def create_key(
    redis: Redis,
    name: str,
    *,
    admin: bool = False,
    rate_per_min: int | None = None,
    max_queued: int | None = None,
    max_priority: Priority | None = None,
) -> tuple[ApiKey, str]:
    """Create key `name`; returns it and its secret (which is stored nowhere).

    Raises ValueError for a bad name or limit, KeyExistsError when the name is taken.
    """
    if not NAME_PATTERN.match(name):
        raise ValueError(
            f"key name {name!r}: use 1-64 letters, digits, '.', '_' or '-', starting with a letter or digit"
        )
    secret = SECRET_PREFIX + secrets.token_urlsafe(SECRET_BYTES)
    stored = StoredKey(
        name=name,
        admin=admin,
        rate_per_min=rate_per_min,
        max_queued=max_queued,
        max_priority=max_priority,
        created_at=time.time(),
        key_hash=hash_secret(secret),
        webhook_secret=new_secret(),
    )
    if not redis.hsetnx(KEYS_KEY, name, stored.model_dump_json()):
        raise KeyExistsError(f"a key named {name!r} exists; revoke it first or choose another name")
    redis.set(hash_key(stored.key_hash), name)
    return stored.public(), secret


def list_keys(redis: Redis) -> list[ApiKey]:
    """Every key, by name, without hashes."""
    raw: dict[bytes, bytes] = redis.hgetall(KEYS_KEY)  # type: ignore[assignment]
    stored = [StoredKey.model_validate_json(value) for value in raw.values()]
    return [key.public() for key in sorted(stored, key=_name)]


def _name(key: ApiKey) -> str:
    return key.name


def revoke_key(redis: Redis, name: str) -> bool:
    """Delete key `name` at once; False when there is none."""
    raw = redis.hget(KEYS_KEY, name)
    if raw is None:
        return False
    stored = StoredKey.model_validate_json(raw)  # type: ignore[arg-type]
    with redis.pipeline() as pipe:
        pipe.hdel(KEYS_KEY, name)
        pipe.delete(hash_key(stored.key_hash))
        pipe.execute()
    return True


def authenticate(redis: Redis, secret: str) -> ApiKey | None:
    """The live key whose secret this is, or None (unknown, revoked or malformed)."""
    if not secret.startswith(SECRET_PREFIX):
        return None
    digest = hash_secret(secret)
    name = redis.get(hash_key(digest))
    if name is None:
        return None
    raw = redis.hget(KEYS_KEY, name.decode())  # type: ignore[union-attr]
    if raw is None:
        return None
    stored = StoredKey.model_validate_json(raw)  # type: ignore[arg-type]
    # Compare in constant time, so the answer's timing says nothing about how much of a hash matched.
    if not hmac.compare_digest(stored.key_hash, digest):
        return None
    return stored.public()


def webhook_secret(redis: Redis, name: str) -> str | None:
    """The secret that signs the webhooks of key `name`'s jobs; None when the key is gone (revoked) or
    was made before webhooks."""
    raw = redis.hget(KEYS_KEY, name)
    return StoredKey.model_validate_json(raw).webhook_secret if raw is not None else None  # type: ignore[arg-type]
