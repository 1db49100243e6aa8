"""Calls to a dependency the App API can answer without: the Redis cache of
workflow records, and the sub-services' live progress in Redis.

Each call is bounded by a short timeout (the Redis adapter's own, 10 s per
attempt with retries, suits the sub-services, for whom Redis is the task store).
After a failure the dependency is left alone for a while, so that a hung one
costs a timeout every few seconds instead of one per request. An outage is
logged when it starts, then every half minute while it lasts, and once when the
dependency answers again.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from typing import TypeVar

from core_base.log_throttle import LogThrottle, held_back_note

logger = logging.getLogger(__name__)
T = TypeVar("T")

# Redis answers in a millisecond; an answer slower than this is worse than none.
DEFAULT_TIMEOUT_S = 1.0
DEFAULT_BYPASS_S = 5.0
# While the dependency keeps failing, a line at most this often.
_REPORT_EVERY_S = 30.0


class BestEffort:
    def __init__(
        self,
        name: str,
        *,
        timeout_s: float = DEFAULT_TIMEOUT_S,
        bypass_s: float = DEFAULT_BYPASS_S,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.name = name
        self._timeout_s = timeout_s
        self._bypass_s = bypass_s
        self._clock = clock
        self._bypassed_until = 0.0
        self._failures = LogThrottle(_REPORT_EVERY_S, clock)

    @property
    def bypassed(self) -> bool:
        return self._clock() < self._bypassed_until

    async def run(self, what: str, operation: Callable[[], Awaitable[T]]) -> T | None:
        """``operation()``'s answer; None while bypassed, or when it fails or takes
        longer than the timeout (which starts a bypass)."""
        if self.bypassed:
            return None
        try:
            async with asyncio.timeout(self._timeout_s):
                answer = await operation()
        except Exception as exc:
            self._bypassed_until = self._clock() + self._bypass_s
            held_back = self._failures.due()
            if held_back is not None:
                logger.warning(
                    "%s %s failed (%s); going without it for %.0f s at a time%s",
                    self.name,
                    what,
                    type(exc).__name__,
                    self._bypass_s,
                    held_back_note(held_back, "such failures"),
                )
            return None
        if self._failures.ended():
            logger.info("%s answers again", self.name)
        return answer
