"""Where the client connects, with which key, and how patiently: arguments first, then the environment."""

import os
from dataclasses import dataclass, field

from dit_serve.client.retries import RetryPolicy

DEFAULT_URL = "http://127.0.0.1:8000"  # `dit-serve up`'s address
URL_ENV = "DIT_URL"
API_KEY_ENV = "DIT_API_KEY"
DEFAULT_TIMEOUT_S = 30.0  # per request; a waiting GET gets its wait on top


@dataclass(frozen=True)
class ClientSettings:
    """One client's connection settings."""

    base_url: str = DEFAULT_URL
    api_key: str | None = None
    timeout_s: float = DEFAULT_TIMEOUT_S
    retries: RetryPolicy = field(default_factory=RetryPolicy)

    @classmethod
    def resolve(
        cls,
        base_url: str | None = None,
        api_key: str | None = None,
        timeout_s: float = DEFAULT_TIMEOUT_S,
        retries: RetryPolicy | None = None,
    ) -> "ClientSettings":
        """Settings from the arguments given, else `DIT_URL` / `DIT_API_KEY`, else the defaults."""
        return cls(
            base_url=(base_url or os.environ.get(URL_ENV) or DEFAULT_URL).rstrip("/"),
            api_key=api_key or os.environ.get(API_KEY_ENV) or None,
            timeout_s=timeout_s,
            retries=retries or RetryPolicy(),
        )

    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}
