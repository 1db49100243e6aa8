"""In-process key-value store: the embedded ``KeyValueStore`` (``REDIS_URL=memory://``).

Same semantics as the Redis adapter (prefixed keys, millisecond TTLs, atomic
``set_if_absent``); expiry follows the monotonic clock, so wall-clock jumps do
not expire keys early. Data lives in this object only: processes that must see
each other's keys share one instance.
"""

from __future__ import annotations

import time
from collections.abc import Sequence

from core_base.adapters.kv_redis import ttl_to_ms

# Expired entries are dropped when read, and the whole dict is swept at most this
# often, so keys nobody reads again cannot grow memory without bound.
_SWEEP_INTERVAL_S = 1.0


class MemoryStore:
    """A dict of ``prefix + key -> (value, expires_at)`` (``expires_at`` monotonic, or None)."""

    def __init__(self, *, prefix: str = "") -> None:
        self.prefix = prefix
        self._data: dict[str, tuple[bytes, float | None]] = {}
        self._next_sweep_at = time.monotonic() + _SWEEP_INTERVAL_S

    async def get(self, key: str) -> bytes | None:
        entry = self._live(self.prefix + key)
        return None if entry is None else entry[0]

    async def set(self, key: str, value: bytes, *, ttl_s: float | None = None) -> None:
        self._store(self.prefix + key, value, ttl_s)

    async def set_if_absent(self, key: str, value: bytes, *, ttl_s: float | None = None) -> bool:
        """Set only when the key does not exist; True when this call set it."""
        full_key = self.prefix + key
        if self._live(full_key) is not None:
            return False
        self._store(full_key, value, ttl_s)
        return True

    async def replace_if_equal(
        self, key: str, expected: bytes, value: bytes, *, ttl_s: float | None = None
    ) -> bool:
        if ttl_s is not None:
            ttl_to_ms(ttl_s)  # a bad TTL is refused whatever the key holds, as on Redis
        full_key = self.prefix + key
        entry = self._live(full_key)
        if entry is None or entry[0] != expected:
            return False
        self._store(full_key, value, ttl_s)
        return True

    async def hold_many(
        self,
        leases: Sequence[tuple[str, bytes]],
        *,
        ttl_s: float,
        read: Sequence[str] = (),
        take_over: bytes = b"",
    ) -> tuple[list[bytes | None], list[bytes | None]]:
        ttl_to_ms(ttl_s)  # a bad TTL is refused whatever the keys hold, as on Redis
        holders: list[bytes | None] = []
        for key, value in leases:
            entry = self._live(self.prefix + key)
            if (
                entry is not None
                and entry[0] != value
                and not (take_over and entry[0].startswith(take_over))
            ):
                holders.append(entry[0])
            else:
                self._store(self.prefix + key, value, ttl_s)
                holders.append(None)
        return holders, await self.get_many(read)

    async def set_many_unless_containing(
        self,
        items: Sequence[tuple[str, bytes]],
        *,
        markers: Sequence[bytes],
        ttl_s: float | None = None,
    ) -> list[bool]:
        if ttl_s is not None:
            ttl_to_ms(ttl_s)  # a bad TTL is refused whatever the keys hold, as on Redis
        done = []
        for key, value in items:
            entry = self._live(self.prefix + key)
            kept = entry is not None and any(marker in entry[0] for marker in markers)
            if not kept:  # through set: a test's store that fails writes fails these too
                await self.set(key, value, ttl_s=ttl_s)
            done.append(not kept)
        return done

    async def delete_many_if_equal(self, items: Sequence[tuple[str, bytes]]) -> list[bool]:
        deleted = []
        for key, expected in items:
            entry = self._live(self.prefix + key)
            deleted.append(entry is not None and entry[0] == expected)
            if deleted[-1]:
                del self._data[self.prefix + key]
        return deleted

    async def get_many(self, keys: Sequence[str]) -> list[bytes | None]:
        return [await self.get(key) for key in keys]

    async def set_many(
        self, items: Sequence[tuple[str, bytes]], *, ttl_s: float | None = None
    ) -> None:
        for key, value in items:
            self._store(self.prefix + key, value, ttl_s)

    async def set_many_if_absent(
        self, items: Sequence[tuple[str, bytes]], *, ttl_s: float | None = None
    ) -> list[bool]:
        return [await self.set_if_absent(key, value, ttl_s=ttl_s) for key, value in items]

    async def delete(self, key: str) -> None:
        self._data.pop(self.prefix + key, None)

    async def delete_many(self, keys: Sequence[str]) -> None:
        for key in keys:
            await self.delete(key)

    async def ttl(self, key: str) -> float | None:
        """Seconds left before the key expires; None when it has no TTL or is missing."""
        entry = self._live(self.prefix + key)
        if entry is None or entry[1] is None:
            return None
        return max(0.0, entry[1] - time.monotonic())

    async def ping(self) -> bool:
        return True

    async def close(self) -> None:
        """Nothing to release; the data stays readable (like a Redis that outlives a client)."""

    def _store(self, full_key: str, value: bytes, ttl_s: float | None) -> None:
        now = time.monotonic()
        expires_at = None if ttl_s is None else now + ttl_to_ms(ttl_s) / 1000
        self._data[full_key] = (bytes(value), expires_at)
        if now >= self._next_sweep_at:
            self._sweep(now)

    def _live(self, full_key: str) -> tuple[bytes, float | None] | None:
        entry = self._data.get(full_key)
        if entry is None:
            return None
        expires_at = entry[1]
        if expires_at is not None and expires_at <= time.monotonic():
            del self._data[full_key]
            return None
        return entry

    def _sweep(self, now: float) -> None:
        expired = [k for k, (_, at) in self._data.items() if at is not None and at <= now]
        for full_key in expired:
            del self._data[full_key]
        self._next_sweep_at = now + _SWEEP_INTERVAL_S
