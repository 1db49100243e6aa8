"""BestEffort: an answer when the dependency gives one in time; None, and a pause
in asking it, when it fails or is slow; an outage logged when it starts, every
half minute, and when it ends, not at every failure."""

from __future__ import annotations

import asyncio
import logging

import pytest

from app_api.best_effort import BestEffort


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


async def test_an_answer_in_time_is_passed_on() -> None:
    async def answer() -> str:
        return "value"

    assert await BestEffort("dep").run("read", answer) == "value"


async def test_a_failure_is_none_and_the_dependency_is_left_alone_for_a_while() -> None:
    clock = Clock()
    guard = BestEffort("dep", bypass_s=5.0, clock=clock)
    calls: list[str] = []

    async def failing() -> str:
        calls.append("failing")
        raise ConnectionError("down")

    async def working() -> str:
        calls.append("working")
        return "value"

    assert await guard.run("read", failing) is None
    assert guard.bypassed
    clock.now += 4.9
    assert await guard.run("read", working) is None
    assert calls == ["failing"]
    clock.now += 0.2
    assert await guard.run("read", working) == "value"
    assert calls == ["failing", "working"] and not guard.bypassed


async def test_a_slow_answer_is_not_waited_for() -> None:
    guard = BestEffort("dep", timeout_s=0.05)

    async def hanging() -> str:
        await asyncio.Event().wait()
        return "never"

    assert await asyncio.wait_for(guard.run("read", hanging), timeout=5) is None
    assert guard.bypassed


async def test_an_outage_is_logged_at_its_start_every_half_minute_and_at_its_end(
    caplog: pytest.LogCaptureFixture,
) -> None:
    clock = Clock()
    guard = BestEffort("Redis", bypass_s=5.0, clock=clock)

    async def failing() -> str:
        raise ConnectionError("down")

    async def working() -> str:
        return "value"

    with caplog.at_level(logging.INFO, logger="app_api.best_effort"):
        for _ in range(12):  # a minute of failures, one after each bypass
            assert await guard.run("read", failing) is None
            clock.now += 5.0
        assert await guard.run("read", working) == "value"

    lines = [record.getMessage() for record in caplog.records]
    assert len(lines) == 3, lines
    assert lines[0].startswith("Redis read failed (ConnectionError)")
    assert "(5 such failures since the last line)" in lines[1]
    assert lines[2] == "Redis answers again"
