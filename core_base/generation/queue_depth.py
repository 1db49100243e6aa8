"""The task queue's depth for the overload check, read from the broker in the
background.

Asking RabbitMQ costs a round trip (a passive queue declare) that every admitted
task would otherwise wait for before its publish. ``MAX_QUEUE_DEPTH`` is a soft
limit (a batch may already take the queue past it by less than its own size),
so a reading a fraction of a second old is as good: the queue may overshoot by
what arrives in that time. A reading older than ``max_age_s`` is still used
while a fresh one is read beside it, up to ``max_stale_s``: a steady stream of
tasks never waits for the broker, and only the first task after a long quiet
spell (or after the broker stopped answering) does. A read that fails is logged
when reads start failing and when they work again, not each time: callers
answered from the stale reading meanwhile would see nothing of it.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable

from core_base.ports.broker import Broker, QueueSpec

logger = logging.getLogger(__name__)

# As stale as the App API's count of active workflows may get (backlog_refresh_s).
DEFAULT_MAX_AGE_S = 0.5
# How old a reading may be and still answer while a fresh one is read: after a
# quiet spell this long, the next task waits for the broker's answer.
DEFAULT_MAX_STALE_S = 5.0


class QueueDepth:
    def __init__(
        self,
        broker: Broker,
        queue: QueueSpec,
        *,
        max_age_s: float = DEFAULT_MAX_AGE_S,
        max_stale_s: float = DEFAULT_MAX_STALE_S,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._broker = broker
        self._queue = queue
        self._max_age_s = max_age_s
        self._max_stale_s = max(max_stale_s, max_age_s)
        self._clock = clock
        self._depth = 0
        self._read_at: float | None = None
        self._reading: asyncio.Future[int] | None = None
        self._failing = False

    async def current(self) -> int:
        """Ready messages: the last reading when it is younger than ``max_age_s``;
        when younger than ``max_stale_s``, the same while a fresh one is read in
        the background; else (or before any) after reading. Concurrent callers
        share one read; a read that fails raises to each caller waiting for it
        (and is tried again by the next caller)."""
        age = None if self._read_at is None else self._clock() - self._read_at
        if age is not None and age < self._max_age_s:
            return self._depth
        if self._reading is None:
            self._reading = asyncio.ensure_future(self._read())
            self._reading.add_done_callback(self._forget_reading)
        if age is not None and age < self._max_stale_s:
            return self._depth
        return await asyncio.shield(self._reading)

    async def _read(self) -> int:
        depth = await self._broker.depth(self._queue)
        self._depth, self._read_at = depth, self._clock()
        return depth

    def _forget_reading(self, reading: asyncio.Future[int]) -> None:
        self._reading = None
        if reading.cancelled():
            return
        failure = reading.exception()  # retrieved here, raised to the callers
        if failure is not None and not self._failing:
            self._failing = True
            logger.warning(
                "cannot read the depth of queue %s (%s); the overload check uses the last"
                " reading for up to %.0f s, then refuses tasks",
                self._queue.name,
                failure,
                self._max_stale_s,
            )
        elif failure is None and self._failing:
            self._failing = False
            logger.info("reading the depth of queue %s again", self._queue.name)
