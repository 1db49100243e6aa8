"""Logging a condition that repeats (a dependency refusing, round after round):
at once when it starts, then at most once per interval, saying how many lines
were held back, and once when it ends, if its start was told. A condition that
flaps (on and off every round) is told at most twice an interval."""

from __future__ import annotations

import time
from collections.abc import Callable


def held_back_note(held_back: int, what: str) -> str:
    """`` (N <what> since the last line)`` for a line that follows held-back ones,
    else nothing."""
    return f" ({held_back} {what} since the last line)" if held_back else ""


class LogThrottle:
    def __init__(self, interval_s: float, clock: Callable[[], float] = time.monotonic) -> None:
        self._interval_s = interval_s
        self._clock = clock
        self._last_line_at: float | None = None  # kept when the condition ends
        self._held_back = 0
        self._told = False  # a line said the condition is on, and none since that it ended

    def due(self) -> int | None:
        """The condition holds now: the number of lines held back since the last
        one (0 the first time) when a line is due, else None (this one is held)."""
        now = self._clock()
        if self._last_line_at is not None and now - self._last_line_at < self._interval_s:
            self._held_back += 1
            return None
        held_back, self._held_back, self._last_line_at = self._held_back, 0, now
        self._told = True
        return held_back

    def ended(self) -> bool:
        """The condition is over: True when a line said it was on (time for one
        saying it ended)."""
        told, self._told = self._told, False
        if told:
            self._held_back = 0
        return told
