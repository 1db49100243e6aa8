"""The task queue's depth for the overload check, read from the broker at most
every ``max_age_s``.

Asking RabbitMQ costs a round trip (a passive queue declare) that every admitted
task would otherwise wait for before its publish. ``MAX_QUEUE_DEPTH`` is a soft
limit (a batch may already take the queue past it by less than its own size),
so a reading a fraction of a second old is as good: the queue may overshoot by
what arrives in that time, never by more.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable

from core_base.ports.broker import Broker, QueueSpec

# As stale as the App API's count of active workflows may get (backlog_refresh_s).
DEFAULT_MAX_AGE_S = 0.5


class QueueDepth:
    def __init__(
        self,
        broker: Broker,
        queue: QueueSpec,
        *,
        max_age_s: float = DEFAULT_MAX_AGE_S,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._broker = broker
        self._queue = queue
        self._max_age_s = max_age_s
        self._clock = clock
        self._depth = 0
        self._read_at: float | None = None
        self._reading: asyncio.Future[int] | None = None

    async def current(self) -> int:
        """Ready messages, as of at most ``max_age_s`` ago. Concurrent callers share
        one read; a read that fails raises to each of them (and is tried again by
        the next caller)."""
        if self._read_at is not None and self._clock() - self._read_at < self._max_age_s:
            return self._depth
        if self._reading is None:
            self._reading = asyncio.ensure_future(self._read())
            self._reading.add_done_callback(self._forget_reading)
        return await asyncio.shield(self._reading)

    async def _read(self) -> int:
        depth = await self._broker.depth(self._queue)
        self._depth, self._read_at = depth, self._clock()
        return depth

    def _forget_reading(self, reading: asyncio.Future[int]) -> None:
        self._reading = None
        if not reading.cancelled():
            reading.exception()  # retrieved here, raised to the callers
