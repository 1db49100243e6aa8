"""Readiness checks: a check that stops passing is logged once, with why; a
hanging one cannot hold up the probe."""

from __future__ import annotations

import asyncio
import logging

import pytest

from core_base.errors import UnavailableError
from core_base.http import health
from core_base.http.health import run_checks


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
    last: dict[str, bool] = {}
    with caplog.at_level(logging.INFO, logger="core_base.http.health"):
        results = await asyncio.wait_for(run_checks(checks, last), timeout=2)
        assert results == {
            "database": True,
            "kv": False,
            "broker": False,
            "storage": False,
            "replica": False,
        }
        await asyncio.wait_for(run_checks(checks, last), timeout=2)  # nothing new: no lines
        checks["kv"] = fine
        await asyncio.wait_for(run_checks(checks, last), timeout=2)
    logged = "\n".join(record.getMessage() for record in caplog.records)
    assert len(caplog.records) == 5, logged
    assert "kv not ready (the check said no)" in logged
    assert "kv ready again" in logged
    assert "broker not ready (ConnectionRefusedError: connection refused by 10.0.0.5" in logged
    assert "storage not ready (no answer within 0.05 s)" in logged
    assert "replica not ready (PostgreSQL: ConnectionRefusedError: [Errno 111] refused)" in logged
    assert "database" not in logged
