"""An independent Standard Webhooks verifier for the tests, written from the
specification rather than from ``app_api.signing``, so a mistake in the
service's signing cannot hide behind the same mistake here."""

from __future__ import annotations

import base64
import hashlib
import hmac


def webhook_key(secret: str) -> bytes:
    """The HMAC key of a ``WEBHOOK_SECRET``: ``whsec_<base64>`` or raw bytes."""
    if secret.startswith("whsec_"):
        return base64.b64decode(secret.removeprefix("whsec_"))
    return secret.encode()


def verify_standard_webhook(headers: dict[str, str], body: bytes, key: bytes) -> bool:
    """True when one of the ``v1`` signatures is HMAC-SHA256 of ``id.timestamp.body``."""
    message_id = headers["webhook-id"]
    timestamp = headers["webhook-timestamp"]
    signed = message_id.encode() + b"." + timestamp.encode() + b"." + body
    expected = base64.b64encode(hmac.new(key, signed, hashlib.sha256).digest()).decode()
    candidates = [s.split(",", 1) for s in headers["webhook-signature"].split(" ")]
    return any(
        len(c) == 2 and c[0] == "v1" and hmac.compare_digest(c[1], expected) for c in candidates
    )
