"""Webhook secrets and signatures, in the Standard Webhooks scheme (https://www.standardwebhooks.com).

A secret is `whsec_` + base64 of random bytes; the signing key is the decoded bytes. Each delivery
carries three headers: `webhook-id` (the same for every attempt of one delivery, so a receiver can
drop duplicates), `webhook-timestamp` (unix seconds of this attempt) and `webhook-signature`:
`v1,` + base64(HMAC-SHA256(key, f"{id}.{timestamp}.{body}")). The receiver recomputes it with the
same secret and compares in constant time; the README's "Webhooks" section has the snippet.
"""

import base64
import binascii
import hashlib
import hmac
import secrets

SECRET_PREFIX = "whsec_"
SECRET_BYTES = 32
MIN_SECRET_BYTES = 16  # an operator's DIT_WEBHOOK_SECRET must carry at least 128 bits
SIGNATURE_VERSION = "v1"
ID_HEADER, TIMESTAMP_HEADER, SIGNATURE_HEADER = "webhook-id", "webhook-timestamp", "webhook-signature"
SECRET_EXAMPLE = (
    'python -c "import base64, secrets; '
    "print('whsec_' + base64.b64encode(secrets.token_bytes(32)).decode())\""
)


def new_secret() -> str:
    """A fresh secret: `whsec_` + base64 of 32 random bytes."""
    return SECRET_PREFIX + base64.b64encode(secrets.token_bytes(SECRET_BYTES)).decode()


def secret_key(secret: str) -> bytes:
    """The signing key of a `whsec_<base64>` secret; ValueError when it is not one."""
    if not secret.startswith(SECRET_PREFIX):
        raise ValueError(f"a webhook secret starts with {SECRET_PREFIX!r}; make one with: {SECRET_EXAMPLE}")
    try:
        key = base64.b64decode(secret.removeprefix(SECRET_PREFIX), validate=True)
    except binascii.Error as exc:
        raise ValueError(
            f"a webhook secret is {SECRET_PREFIX!r} + base64; make one with: {SECRET_EXAMPLE}"
        ) from exc
    if len(key) < MIN_SECRET_BYTES:
        raise ValueError(
            f"a webhook secret holds at least {MIN_SECRET_BYTES} bytes; make one with: {SECRET_EXAMPLE}"
        )
    return key


def signature(secret: str, message_id: str, timestamp: int, body: bytes) -> str:
    """`v1,<base64 HMAC-SHA256>` over `id.timestamp.body`."""
    signed = f"{message_id}.{timestamp}.".encode() + body
    digest = hmac.new(secret_key(secret), signed, hashlib.sha256).digest()
    return f"{SIGNATURE_VERSION},{base64.b64encode(digest).decode()}"


def signed_headers(secret: str, message_id: str, timestamp: int, body: bytes) -> dict[str, str]:
    """The three Standard Webhooks headers of one attempt."""
    return {
        ID_HEADER: message_id,
        TIMESTAMP_HEADER: str(timestamp),
        SIGNATURE_HEADER: signature(secret, message_id, timestamp, body),
    }
