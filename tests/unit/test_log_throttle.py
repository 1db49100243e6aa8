"""LogThrottle: a line when a condition starts, then at most one an interval with
the count held back, one when it ends; a flapping condition is told at most
twice an interval."""

from __future__ import annotations

from core_base.log_throttle import LogThrottle


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_a_lasting_condition_is_told_once_an_interval_with_what_was_held_back() -> None:
    clock = Clock()
    throttle = LogThrottle(30, clock)
    assert throttle.due() == 0
    for _ in range(5):
        clock.now += 1
        assert throttle.due() is None
    clock.now += 30
    assert throttle.due() == 5
    assert throttle.ended() is True
    assert throttle.ended() is False  # said once


def test_a_flapping_condition_is_told_at_most_twice_an_interval() -> None:
    clock = Clock()
    throttle = LogThrottle(30, clock)
    lines = 0
    for _ in range(20):  # on and off every second for 20 s
        lines += throttle.due() is not None
        lines += throttle.ended()
        clock.now += 1
    assert lines == 2  # on, then off; nothing more within the interval
    clock.now += 30
    assert throttle.due() == 19  # the starts held back meanwhile
