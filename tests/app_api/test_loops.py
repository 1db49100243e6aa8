"""``Loop``: rounds every interval, at once when woken (also mid-round), a failing
round never ends it, and stop ends it (a round under way within its grace)."""

from __future__ import annotations

import asyncio
import logging

import pytest

from app_api.loops import Loop
from core_base.errors import UnavailableError
from tests.app_api.support import eventually

LONG_S = 60.0  # an interval no test waits for


async def _true(value: bool) -> bool:
    return value


async def test_rounds_repeat_every_interval() -> None:
    rounds = 0

    async def step() -> None:
        nonlocal rounds
        rounds += 1

    loop = Loop("test", step, interval_s=0.01)
    loop.start()
    try:
        await eventually(lambda: _true(rounds >= 3), timeout_s=5, what="three rounds")
    finally:
        await loop.stop()


async def test_a_wake_runs_the_next_round_now() -> None:
    rounds = 0

    async def step() -> None:
        nonlocal rounds
        rounds += 1

    loop = Loop("test", step, interval_s=LONG_S)
    loop.start()
    try:
        await eventually(lambda: _true(rounds == 1), timeout_s=5, what="first round")
        loop.wake()
        await eventually(lambda: _true(rounds == 2), timeout_s=5, what="woken round")
        loop.wake()
        loop.wake()  # wakes that come together make one round
        await eventually(lambda: _true(rounds == 3), timeout_s=5, what="woken round")
        await asyncio.sleep(0.05)
        assert rounds == 3
    finally:
        await loop.stop()


async def test_a_wake_during_a_round_runs_another_right_after_it() -> None:
    rounds = 0
    release = asyncio.Event()

    async def step() -> None:
        nonlocal rounds
        rounds += 1
        if rounds == 1:
            await release.wait()

    loop = Loop("test", step, interval_s=LONG_S)
    loop.start()
    try:
        await eventually(lambda: _true(rounds == 1), timeout_s=5, what="first round")
        loop.wake()  # work arrived while the first round was busy
        release.set()
        await eventually(lambda: _true(rounds == 2), timeout_s=5, what="second round")
    finally:
        await loop.stop()


async def test_a_failing_round_is_retried_and_stop_ends_the_loop() -> None:
    rounds = 0

    async def step() -> None:
        nonlocal rounds
        rounds += 1
        raise RuntimeError("database blip")

    loop = Loop("test", step, interval_s=0.01)
    loop.start()
    await eventually(lambda: _true(rounds >= 2), timeout_s=5, what="a retried round")
    await loop.stop()
    stopped_at = rounds
    await asyncio.sleep(0.05)
    assert rounds == stopped_at


async def test_a_failing_step_backs_off_and_is_reported_once_then_on_recovery(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A dependency down: every round fails. The rounds thin out (the pause
    doubles), the log gets one line for the outage and one when it is over."""
    rounds = 0
    down = True

    async def step() -> None:
        nonlocal rounds
        rounds += 1
        if down:
            raise UnavailableError("PostgreSQL unreachable")

    loop = Loop("test", step, interval_s=0.01)
    with caplog.at_level(logging.INFO, logger="app_api.loops"):
        loop.start()
        try:
            await asyncio.sleep(0.5)
            # Pauses of 10, 20, 40, 80, 160 ms...: about 6 rounds, not 50.
            assert 3 <= rounds <= 10, rounds
            down = False
            await eventually(
                lambda: _true("working again" in caplog.text), timeout_s=5, what="recovery"
            )
        finally:
            await loop.stop()
    lines = [record.getMessage() for record in caplog.records]
    assert len(lines) == 2, lines
    assert "PostgreSQL unreachable" in lines[0] and "retrying" in lines[0]
    assert not caplog.records[0].exc_info  # an outage needs no traceback
    assert "working again" in lines[1]


async def test_a_stop_lets_a_round_under_way_finish_within_its_grace() -> None:
    started, finished = asyncio.Event(), 0

    async def step() -> None:
        nonlocal finished
        started.set()
        await asyncio.sleep(0.2)
        finished += 1

    loop = Loop("test", step, interval_s=LONG_S)
    loop.start()
    await started.wait()
    await loop.stop(grace_s=LONG_S)
    assert finished == 1


async def test_a_round_outlasting_the_grace_is_cancelled() -> None:
    started, cancelled = asyncio.Event(), False

    async def step() -> None:
        nonlocal cancelled
        started.set()
        try:
            await asyncio.sleep(LONG_S)
        except asyncio.CancelledError:
            cancelled = True
            raise

    loop = Loop("test", step, interval_s=LONG_S)
    loop.start()
    await started.wait()
    await asyncio.wait_for(loop.stop(grace_s=0.1), timeout=5)
    assert cancelled


async def test_a_stop_between_rounds_does_not_wait_out_the_grace() -> None:
    rounds = 0

    async def step() -> None:
        nonlocal rounds
        rounds += 1

    loop = Loop("test", step, interval_s=LONG_S)
    loop.start()
    await eventually(lambda: _true(rounds == 1), timeout_s=5, what="first round")
    await asyncio.wait_for(loop.stop(grace_s=LONG_S), timeout=5)
    assert rounds == 1


async def test_a_stop_during_a_failing_round_does_not_wait_out_its_backoff() -> None:
    stopping = asyncio.Event()

    async def step() -> None:
        await stopping.wait()
        raise UnavailableError("PostgreSQL unreachable")

    loop = Loop("test", step, interval_s=LONG_S)  # a backoff of at least the interval
    loop.start()
    await asyncio.sleep(0.05)
    stopped = asyncio.create_task(loop.stop(grace_s=LONG_S))
    await asyncio.sleep(0.05)
    stopping.set()  # the round fails during the stop
    await asyncio.wait_for(stopped, timeout=5)
