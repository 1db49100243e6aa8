"""Readiness checks: a check that stops passing is logged once, with why; a
hanging one cannot hold up the probe, nor pile up."""

from __future__ import annotations

import asyncio
import logging

import pytest

from core_base.errors import UnavailableError
from core_base.http import health
from core_base.http.health import ReadinessChecks


async def test_each_failing_check_is_logged_with_its_reason(
    caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(health, "CHECK_TIMEOUT_S", 0.05)

    async def fine() -> bool:
        return True

    async def down() -> bool:
        return False

    async def broken() -> bool:
        raise ConnectionRefusedError("connection refused by 10.0.0.5:6379")

    async def hanging() -> bool:
        await asyncio.sleep(10)
        return True

    async def unreachable() -> bool:  # as the adapters' pings say why
        raise UnavailableError("PostgreSQL: ConnectionRefusedError: [Errno 111] refused")

    checks = {
        "database": fine,
        "kv": down,
        "broker": broken,
        "storage": hanging,
        "replica": unreachable,
    }
    readiness = ReadinessChecks(checks)
    with caplog.at_level(logging.INFO, logger="core_base.http.health"):
        results = await asyncio.wait_for(readiness.run(), timeout=2)
        assert results == {
            "database": True,
            "kv": False,
            "broker": False,
            "storage": False,
            "replica": False,
        }
        await asyncio.wait_for(readiness.run(), timeout=2)  # nothing new: no lines
        checks["kv"] = fine
        await asyncio.wait_for(readiness.run(), timeout=2)
    logged = "\n".join(record.getMessage() for record in caplog.records)
    assert len(caplog.records) == 5, logged
    assert "kv not ready (the check said no)" in logged
    assert "kv ready again" in logged
    assert "broker not ready (ConnectionRefusedError: connection refused by 10.0.0.5" in logged
    assert "storage not ready (no answer within 0.05 s)" in logged
    assert "replica not ready (PostgreSQL: ConnectionRefusedError: [Errno 111] refused)" in logged
    assert "database" not in logged


async def test_a_check_slow_to_let_go_does_not_hold_the_probe(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A query cancelled on a hung PostgreSQL takes seconds to give its connection
    back: the probe answers at its timeout all the same (it took 7 s)."""
    monkeypatch.setattr(health, "CHECK_TIMEOUT_S", 0.05)
    release = asyncio.Event()

    async def slow_to_let_go() -> bool:
        try:
            await release.wait()
        except asyncio.CancelledError:
            await asyncio.sleep(5)
            raise
        return True

    readiness = ReadinessChecks({"database": slow_to_let_go})
    assert await asyncio.wait_for(readiness.run(), timeout=1) == {"database": False}
    release.set()


async def test_a_hung_check_is_not_started_again_while_it_hangs(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Probes every few seconds on a hung S3 started a boto3 call each, a thread
    each, until the pool was full: now they wait on the one in flight."""
    monkeypatch.setattr(health, "CHECK_TIMEOUT_S", 0.05)
    release = asyncio.Event()
    started = 0

    async def hung_until_released() -> bool:
        nonlocal started
        started += 1
        await release.wait()
        return True

    readiness = ReadinessChecks({"storage": hung_until_released})
    for _ in range(3):
        assert await readiness.run() == {"storage": False}
    assert started == 1
    release.set()
    await asyncio.sleep(0)  # the hung check answers
    assert await readiness.run() == {"storage": True}
    assert started == 2  # a fresh check, not the old answer


def test_a_check_left_hanging_on_a_stopped_loop_is_not_waited_on(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """An app served again on a new event loop (tests, an embedded server restarted)
    starts its checks afresh: a check of the old loop will never answer."""
    monkeypatch.setattr(health, "CHECK_TIMEOUT_S", 0.05)
    started = 0

    async def check() -> bool:
        nonlocal started
        started += 1
        if started == 1:  # the first never answers
            await asyncio.get_running_loop().create_future()
        return True

    readiness = ReadinessChecks({"database": check})
    old_loop = asyncio.new_event_loop()
    try:
        assert old_loop.run_until_complete(readiness.run()) == {"database": False}
        # The old loop is stopped, its check still pending: a new loop checks again.
        assert asyncio.run(readiness.run()) == {"database": True}
        assert started == 2
    finally:
        for task in asyncio.all_tasks(old_loop):
            task.cancel()
        old_loop.run_until_complete(asyncio.sleep(0))
        old_loop.close()
