"""Logging a condition that repeats (a dependency refusing, round after round):
at once when it starts, then at most once per interval, saying how many lines
were held back, and once when it ends."""

from __future__ import annotations

import time
from collections.abc import Callable


class LogThrottle:
    def __init__(self, interval_s: float, clock: Callable[[], float] = time.monotonic) -> None:
        self._interval_s = interval_s
        self._clock = clock
        self._logged_at: float | None = None  # None: the condition is not on
        self._held_back = 0

    @property
    def active(self) -> bool:
        """The condition was logged and has not ended since."""
        return self._logged_at is not None

    def due(self) -> int | None:
        """The condition holds now: the number of lines held back since the last
        one (0 the first time) when a line is due, else None (this one is held)."""
        now = self._clock()
        if self._logged_at is not None and now - self._logged_at < self._interval_s:
            self._held_back += 1
            return None
        held_back, self._held_back, self._logged_at = self._held_back, 0, now
        return held_back

    def ended(self) -> bool:
        """The condition is over: True when it was on (time for a line saying so)."""
        was_on = self._logged_at is not None
        self._logged_at, self._held_back = None, 0
        return was_on
