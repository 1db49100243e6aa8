"""The object storage port (S3 or local files). Objects are private; reads go
through expiring presigned URLs."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol


class ObjectStorage(Protocol):
    async def connect(self) -> None:
        """Build what the first request would otherwise build (clients, the
        addresses objects live at), so that it is not paid by a task; makes no
        request to the store, so it succeeds with the store down. Idempotent."""

    async def check(self) -> None:
        """Ask the store whether it takes the settings, once, as a process starts:
        ``SettingsError`` naming the variables when it refuses them (credentials, a
        bucket that does not exist), where every task would otherwise fail. A store
        out of reach passes (it is logged; readiness shows it, and work waits for
        it). At work, the same refusals are ``UnavailableError``."""

    async def ensure_bucket(self) -> None:
        """Create the bucket/directory when missing; idempotent."""

    async def put(self, key: str, data: bytes, *, content_type: str) -> None:
        """Store (or overwrite) one object."""

    async def get(self, key: str) -> bytes:
        """Read one object; raises ``NotFoundError`` when missing."""
        ...

    async def exists(self, key: str) -> bool: ...

    async def delete_many(self, keys: Sequence[str]) -> None:
        """Delete these objects; one that is not there is no error (idempotent).
        Raises ``UnavailableError`` when any of them may still be there:
        ``NotDeletedError``, naming them, when the store refused those and
        deleted the others."""

    async def presigned_url(self, key: str, *, expires_s: int) -> str:
        """A URL a client can GET for ``expires_s`` seconds, without credentials."""
        ...

    async def ping(self) -> bool:
        """True when reachable now. Not reachable: False, or ``UnavailableError``
        saying why (the readiness probe logs it)."""
        ...

    async def close(self) -> None: ...
