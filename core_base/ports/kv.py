"""The key-value port (Redis or in-memory): bytes values, optional TTLs."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol


class KeyValueStore(Protocol):
    """Keys are given without the deployment prefix; the adapter adds it."""

    async def get(self, key: str) -> bytes | None: ...

    async def set(self, key: str, value: bytes, *, ttl_s: float | None = None) -> None: ...

    async def set_if_absent(self, key: str, value: bytes, *, ttl_s: float | None = None) -> bool:
        """Set only when the key does not exist; True when this call set it."""
        ...

    async def replace_if_equal(
        self, key: str, expected: bytes, value: bytes, *, ttl_s: float | None = None
    ) -> bool:
        """Set ``value`` only while the key holds ``expected`` (compare and set, atomic);
        True when this call set it. A missing key holds nothing: False."""
        ...

    async def hold_many(
        self,
        leases: Sequence[tuple[str, bytes]],
        *,
        ttl_s: float,
        read: Sequence[str] = (),
        take_over: bytes = b"",
    ) -> tuple[list[bytes | None], list[bytes | None]]:
        """Take or renew a lease on each ``(key, value)``: the key is set to the
        value, with the TTL, where it is missing, holds that value already, or
        holds a value starting with ``take_over`` (when not empty: the caller's own
        stale leases); one that another value holds is left alone. The keys of
        ``read`` are read in the same round trip, atomically with the leases.
        Returns, per lease, None where this call holds it now, else the value
        holding it; and the values of ``read`` in order (None where missing)."""
        ...

    async def set_many_unless_containing(
        self,
        items: Sequence[tuple[str, bytes]],
        *,
        markers: Sequence[bytes],
        ttl_s: float | None = None,
    ) -> list[bool]:
        """``set`` each ``(key, value)`` unless the key's current value contains one of
        ``markers`` (each atomic on its own), in one round trip; True where set."""
        ...

    async def delete_many_if_equal(self, items: Sequence[tuple[str, bytes]]) -> list[bool]:
        """Delete each key only while it holds the given value (each atomic on its
        own), in one round trip; True where this call deleted it."""
        ...

    async def get_many(self, keys: Sequence[str]) -> list[bytes | None]:
        """The values of ``keys`` in order (None where missing), in one round trip."""
        ...

    async def set_many(
        self, items: Sequence[tuple[str, bytes]], *, ttl_s: float | None = None
    ) -> None:
        """``set`` for each ``(key, value)`` in one round trip (not atomic as a whole)."""
        ...

    async def set_many_if_absent(
        self, items: Sequence[tuple[str, bytes]], *, ttl_s: float | None = None
    ) -> list[bool]:
        """``set_if_absent`` for each ``(key, value)`` in one round trip; each is
        atomic on its own, the batch is not. True where this call set the key."""
        ...

    async def delete(self, key: str) -> None: ...

    async def delete_many(self, keys: Sequence[str]) -> None:
        """``delete`` for each, in one round trip."""
        ...

    async def ttl(self, key: str) -> float | None:
        """Seconds left before the key expires; None when it has no TTL or is missing."""
        ...

    async def ping(self) -> bool:
        """True when reachable now. Not reachable: False, or ``UnavailableError``
        saying why (the readiness probe logs it)."""
        ...

    async def close(self) -> None: ...
