"""Redis key-value store (``redis.asyncio``, one connection pool per store).

Every key is written as ``prefix + key`` so that deployments and tests can share
a Redis database. A Redis that cannot be reached surfaces as ``UnavailableError``
(retry later), saying why.
"""

from __future__ import annotations

import math
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager

import redis.asyncio as redis
from redis.asyncio.retry import Retry
from redis.backoff import ExponentialBackoff
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import (
    MasterDownError,
    OutOfMemoryError,
    ReadOnlyError,
    RedisError,
    TryAgainError,
)
from redis.exceptions import TimeoutError as RedisTimeoutError

from core_base.errors import UnavailableError

# Fail fast when Redis is down instead of hanging a request; the callers retry.
# Every command we send answers in well under a millisecond, so an answer 5 s late
# means a hung Redis or a network dropping packets: the request gets its 503 before
# the caller's own HTTP timeout (HTTP_TIMEOUT_S, 10 s) gives up on it.
_CONNECT_TIMEOUT_S = 5.0
_SOCKET_TIMEOUT_S = 5.0
_MAX_CONNECTIONS = 64
# A restarted Redis (or one that dropped our connections) is retried on a fresh
# connection a few times before the caller sees UnavailableError: ~0.05-0.4 s.
# Every command we send is safe to repeat; a SET NX whose reply was lost may
# answer "already set" on the retry, which callers must (and do) tolerate.
# Timeouts are not retried: a Redis that did not answer for 5 s will most likely
# not answer the next try either, and 4 retries made one call wait 25 s.
_RETRIES = 4
# Compare and set in one step on the server: SET only while GET answers the
# expected value (a missing key answers false, never equal). ARGV[3] is the TTL in
# milliseconds, or empty for none.
_REPLACE_IF_EQUAL = """
if redis.call('GET', KEYS[1]) ~= ARGV[1] then return 0 end
if ARGV[3] == '' then redis.call('SET', KEYS[1], ARGV[2])
else redis.call('SET', KEYS[1], ARGV[2], 'PX', ARGV[3]) end
return 1
"""

# Each key deleted only while it holds its value: KEYS, and one ARGV per key.
_DELETE_MANY_IF_EQUAL = """
local deleted = {}
for i = 1, #KEYS do
  if redis.call('GET', KEYS[i]) == ARGV[i] then
    deleted[i] = redis.call('DEL', KEYS[i])
  else
    deleted[i] = 0
  end
end
return deleted
"""

# Each key set unless its value contains a marker. KEYS: the keys. ARGV: the TTL in
# ms ('' for none), the number of markers, the markers, then each key's value.
_SET_MANY_UNLESS_CONTAINING = """
local px, count = ARGV[1], tonumber(ARGV[2])
local done = {}
for i = 1, #KEYS do
  local current = redis.call('GET', KEYS[i])
  local kept = false
  if current then
    for m = 1, count do
      if string.find(current, ARGV[2 + m], 1, true) then kept = true end
    end
  end
  if kept then
    done[i] = 0
  else
    if px == '' then redis.call('SET', KEYS[i], ARGV[2 + count + i])
    else redis.call('SET', KEYS[i], ARGV[2 + count + i], 'PX', px) end
    done[i] = 1
  end
end
return done
"""

# Leases taken or renewed, then keys read, in one call (one round trip, whatever
# the count; no pipeline, whose script check would be a round trip of its own).
# KEYS: the leases' keys, then the keys to read. ARGV: the TTL in ms, the number of
# leases, the take-over prefix ('' for none), then each lease's value. Per lease:
# false (nil) when the caller holds it now, else the value holding it.
_HOLD_MANY = """
local px, leases, prefix = ARGV[1], tonumber(ARGV[2]), ARGV[3]
local replies = {}
for i = 1, leases do
  local value = ARGV[3 + i]
  local current = redis.call('GET', KEYS[i])
  if current and current ~= value
      and (prefix == '' or string.sub(current, 1, #prefix) ~= prefix) then
    replies[i] = current
  else
    redis.call('SET', KEYS[i], value, 'PX', px)
    replies[i] = false
  end
end
for i = leases + 1, #KEYS do
  replies[i] = redis.call('GET', KEYS[i])
end
return replies
"""


def _as_bytes(value: object) -> bytes | None:
    """A reply as bytes (str only when a client decodes responses)."""
    return value if value is None or isinstance(value, bytes) else str(value).encode()


def ttl_to_ms(ttl_s: float) -> int:
    """A TTL in whole milliseconds (at least 1), as Redis' ``PX`` takes it."""
    if not ttl_s > 0 or math.isinf(ttl_s):
        raise ValueError(f"ttl_s must be a positive finite number of seconds, got {ttl_s!r}")
    return max(1, math.ceil(ttl_s * 1000))


class RedisStore:
    """``KeyValueStore`` on Redis. ``url`` is ``redis://`` or ``rediss://``."""

    def __init__(
        self, url: str, *, prefix: str, socket_timeout_s: float = _SOCKET_TIMEOUT_S
    ) -> None:
        self.prefix = prefix
        self._client: redis.Redis = redis.Redis.from_url(
            url,
            socket_connect_timeout=_CONNECT_TIMEOUT_S,
            socket_timeout=socket_timeout_s,
            max_connections=_MAX_CONNECTIONS,
            health_check_interval=30,
            # Only connection errors: redis-py's default retries timeouts too.
            retry=Retry(
                ExponentialBackoff(cap=0.5, base=0.05),
                _RETRIES,
                supported_errors=(RedisConnectionError,),
            ),
        )
        self._replace_if_equal = self._client.register_script(_REPLACE_IF_EQUAL)
        self._delete_many_if_equal = self._client.register_script(_DELETE_MANY_IF_EQUAL)
        self._hold_many = self._client.register_script(_HOLD_MANY)
        self._set_many_unless_containing = self._client.register_script(_SET_MANY_UNLESS_CONTAINING)

    async def get(self, key: str) -> bytes | None:
        async with _unavailable_on_connection_error():
            value = await self._client.get(self.prefix + key)
        if value is None or isinstance(value, bytes):
            return value
        return str(value).encode()  # only when a client decodes responses

    async def set(self, key: str, value: bytes, *, ttl_s: float | None = None) -> None:
        px = None if ttl_s is None else ttl_to_ms(ttl_s)
        async with _unavailable_on_connection_error():
            await self._client.set(self.prefix + key, value, px=px)

    async def set_if_absent(self, key: str, value: bytes, *, ttl_s: float | None = None) -> bool:
        """Set only when the key does not exist (``SET NX``); True when this call set it."""
        px = None if ttl_s is None else ttl_to_ms(ttl_s)
        async with _unavailable_on_connection_error():
            done = await self._client.set(self.prefix + key, value, px=px, nx=True)
        return bool(done)

    async def replace_if_equal(
        self, key: str, expected: bytes, value: bytes, *, ttl_s: float | None = None
    ) -> bool:
        """Compare and set in a server-side script. A retry after a lost reply finds
        the new value and answers False: callers read the key again to see why."""
        px = "" if ttl_s is None else str(ttl_to_ms(ttl_s))
        async with _unavailable_on_connection_error():
            done = await self._replace_if_equal(
                keys=[self.prefix + key], args=[expected, value, px]
            )
        return bool(done)

    async def hold_many(
        self,
        leases: Sequence[tuple[str, bytes]],
        *,
        ttl_s: float,
        read: Sequence[str] = (),
        take_over: bytes = b"",
    ) -> tuple[list[bytes | None], list[bytes | None]]:
        """One server-side script for every lease and read (atomic as a whole)."""
        px = ttl_to_ms(ttl_s)
        if not leases and not read:
            return [], []
        keys = [self.prefix + key for key, _ in leases] + [self.prefix + key for key in read]
        args: list[bytes | int] = [px, len(leases), take_over, *(value for _, value in leases)]
        async with _unavailable_on_connection_error():
            replies = await self._hold_many(keys=keys, args=args)
        values = [_as_bytes(reply) for reply in replies]
        return values[: len(leases)], values[len(leases) :]

    async def set_many_unless_containing(
        self,
        items: Sequence[tuple[str, bytes]],
        *,
        markers: Sequence[bytes],
        ttl_s: float | None = None,
    ) -> list[bool]:
        """One server-side script for every key."""
        px = b"" if ttl_s is None else ttl_to_ms(ttl_s)
        if not items:
            return []
        args: list[bytes | int] = [px, len(markers), *markers, *(value for _, value in items)]
        async with _unavailable_on_connection_error():
            done = await self._set_many_unless_containing(
                keys=[self.prefix + key for key, _ in items], args=args
            )
        return [bool(d) for d in done]

    async def delete_many_if_equal(self, items: Sequence[tuple[str, bytes]]) -> list[bool]:
        """One server-side script for every key."""
        if not items:
            return []
        async with _unavailable_on_connection_error():
            done = await self._delete_many_if_equal(
                keys=[self.prefix + key for key, _ in items], args=[value for _, value in items]
            )
        return [bool(d) for d in done]

    async def get_many(self, keys: Sequence[str]) -> list[bytes | None]:
        """``MGET``: the values in order, None where missing."""
        if not keys:
            return []
        async with _unavailable_on_connection_error():
            values = await self._client.mget([self.prefix + key for key in keys])
        return [_as_bytes(v) for v in values]

    async def set_many(
        self, items: Sequence[tuple[str, bytes]], *, ttl_s: float | None = None
    ) -> None:
        """One pipeline of ``SET`` (not a transaction)."""
        await self._pipelined_sets(items, ttl_s, nx=False)

    async def set_many_if_absent(
        self, items: Sequence[tuple[str, bytes]], *, ttl_s: float | None = None
    ) -> list[bool]:
        """One pipeline of ``SET NX`` (not a transaction: each key stands alone)."""
        return await self._pipelined_sets(items, ttl_s, nx=True)

    async def _pipelined_sets(
        self, items: Sequence[tuple[str, bytes]], ttl_s: float | None, *, nx: bool
    ) -> list[bool]:
        if not items:
            return []
        px = None if ttl_s is None else ttl_to_ms(ttl_s)
        async with _unavailable_on_connection_error():
            async with self._client.pipeline(transaction=False) as pipe:
                for key, value in items:
                    pipe.set(self.prefix + key, value, px=px, nx=nx)
                done = await pipe.execute()
        return [bool(d) for d in done]

    async def delete(self, key: str) -> None:
        async with _unavailable_on_connection_error():
            await self._client.delete(self.prefix + key)

    async def delete_many(self, keys: Sequence[str]) -> None:
        """One ``DEL`` of every key."""
        if not keys:
            return
        async with _unavailable_on_connection_error():
            await self._client.delete(*(self.prefix + key for key in keys))

    async def ttl(self, key: str) -> float | None:
        """Seconds left before the key expires; None when it has no TTL or is missing."""
        async with _unavailable_on_connection_error():
            left_ms = int(await self._client.pttl(self.prefix + key))
        # PTTL answers -2 for a missing key and -1 for a key without expiry.
        return None if left_ms < 0 else left_ms / 1000

    async def ping(self) -> bool:
        try:
            return bool(await self._client.ping())
        except (RedisError, OSError) as exc:
            raise UnavailableError(f"Redis: {type(exc).__name__}: {exc}".rstrip(": ")) from exc

    async def close(self) -> None:
        await self._client.aclose()


_REFUSING_NOW = (ReadOnlyError, OutOfMemoryError, MasterDownError, TryAgainError)


@asynccontextmanager
async def _unavailable_on_connection_error() -> AsyncIterator[None]:
    try:
        yield
    except (RedisConnectionError, RedisTimeoutError, OSError) as exc:
        raise UnavailableError(f"Redis unreachable: {exc}") from exc
    except _REFUSING_NOW as exc:
        # A replica after a failover, a full memory, a cluster re-electing: Redis
        # is there but cannot write now; like an outage, it passes.
        raise UnavailableError(f"Redis cannot serve writes now: {exc}") from exc
