"""Standard Webhooks signatures (https://www.standardwebhooks.com).

``webhook-signature: v1,<base64 HMAC-SHA256 of "{id}.{timestamp}.{body}">``.

The key: a ``WEBHOOK_SECRET`` of the Standard Webhooks form ``whsec_<base64>``
is base64-decoded, padded or not (so the official verifier libraries accept our
signatures given the same string); any other value is used as raw UTF-8 key
bytes, which those libraries know as ``whsec_<base64 of the value>`` (they
would base64-decode the bare value: another key).
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac

from core_base.errors import SettingsError

SECRET_PREFIX = "whsec_"


def signing_key(secret: str) -> bytes:
    """The HMAC key for ``WEBHOOK_SECRET`` (see the module docstring)."""
    if secret.startswith(SECRET_PREFIX):
        encoded = secret.removeprefix(SECRET_PREFIX)
        try:
            # Unpadded too, as the reference libraries take it.
            key = base64.b64decode(encoded + "=" * (-len(encoded) % 4), validate=True)
        except (binascii.Error, ValueError):
            raise SettingsError("WEBHOOK_SECRET: the part after 'whsec_' is not base64") from None
        if not key:
            raise SettingsError("WEBHOOK_SECRET: empty key after 'whsec_'")
        return key
    return secret.encode("utf-8")


def sign(key: bytes, message_id: str, timestamp_s: int, body: bytes) -> str:
    """The ``webhook-signature`` header value for one attempt."""
    signed = f"{message_id}.{timestamp_s}.".encode() + body
    digest = hmac.new(key, signed, hashlib.sha256).digest()
    return "v1," + base64.b64encode(digest).decode("ascii")


def webhook_headers(key: bytes, message_id: str, timestamp_s: int, body: bytes) -> dict[str, str]:
    return {
        "webhook-id": message_id,
        "webhook-timestamp": str(timestamp_s),
        "webhook-signature": sign(key, message_id, timestamp_s, body),
    }
