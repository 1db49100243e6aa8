"""Posting results back to the App API: retried for about nine minutes with a
capped backoff (PostgreSQL down behind the App API for minutes included), a
refusal not retried, and every attempt logged before its pause."""

from __future__ import annotations

import logging
from collections.abc import Iterator

import pytest

from app_api.options import AppOptions
from core_base.contracts import TaskResult
from core_base.domain import Kind, TaskStatus
from core_base.generation.callbacks import CallbackSender
from core_base.http.client import HttpClient
from tests.support.receiver import Receiver, run_receiver

RESULT = TaskResult(task_id="t-1", kind=Kind.SOUND, status=TaskStatus.FAILED, error="x")


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    with run_receiver() as receiver:
        yield receiver


@pytest.fixture
def pauses() -> list[float]:
    """The pauses between attempts (see :func:`sender`)."""
    return []


def sender(client: HttpClient, token: str, pauses: list[float]) -> CallbackSender:
    """A sender that notes its pauses and takes them at once."""

    async def no_wait(seconds: float) -> None:
        pauses.append(seconds)

    return CallbackSender(client, token, sleep=no_wait)


async def test_an_unavailable_app_api_is_retried_for_nine_minutes(
    receiver: Receiver, pauses: list[float], caplog: pytest.LogCaptureFixture
) -> None:
    """Longer than the App API's reconciler waits for news of a task (5 minutes):
    after an outage of minutes the result arrives within 30 s of the return, not
    when the reconciler gets round to the task."""
    receiver.statuses = [503] * 30
    client = HttpClient()
    try:
        with caplog.at_level(logging.WARNING):
            sent = await sender(client, "t", pauses).send(f"{receiver.url}/cb", RESULT)
    finally:
        await client.aclose()

    assert not sent
    assert len(receiver.snapshot()) == 24
    assert pauses == [0.5, 1, 2, 4, 8, 16] + [30] * 17
    assert sum(pauses) > 540
    assert sum(pauses) > AppOptions().reconcile_stale_after_s + 60
    lines = [r.getMessage() for r in caplog.records]
    assert lines[0].endswith("attempt 1 of 24; next in 0.5s")
    assert "giving up" in lines[-1]


async def test_a_refused_callback_is_not_retried_and_names_the_likely_cause(
    receiver: Receiver, pauses: list[float], caplog: pytest.LogCaptureFixture
) -> None:
    receiver.statuses = [401]
    client = HttpClient()
    try:
        sent = await sender(client, "wrong", pauses).send(f"{receiver.url}/cb", RESULT)
    finally:
        await client.aclose()

    assert not sent and len(receiver.snapshot()) == 1 and pauses == []
    assert "INTERNAL_TOKEN" in caplog.text


async def test_a_blip_costs_a_retry_then_the_callback_arrives(
    receiver: Receiver, pauses: list[float], caplog: pytest.LogCaptureFixture
) -> None:
    """Each failed attempt says why, in the App API's words when it gave some;
    the arrival after them is said too."""
    receiver.statuses = [503, 502, 204]
    receiver.answer = b'{"error":"unavailable","message":"PostgreSQL unreachable: refused"}'
    client = HttpClient()
    try:
        with caplog.at_level(logging.INFO, logger="core_base.generation.callbacks"):
            assert await sender(client, "t", pauses).send(f"{receiver.url}/cb", RESULT)
    finally:
        await client.aclose()
    assert len(receiver.snapshot()) == 3 and pauses == [0.5, 1]
    lines = [r.getMessage() for r in caplog.records]
    assert "(HTTP 503: PostgreSQL unreachable: refused)" in lines[0], lines
    assert lines[-1] == "callback for t-1 delivered on attempt 3", lines
