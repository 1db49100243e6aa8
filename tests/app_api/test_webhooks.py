"""Client webhooks: signatures checked by an independent verifier, retries with a
stable webhook-id, durability across an App API restart, the SSRF re-check."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import ipaddress
import json
import logging
import random
import socket
import time
import uuid
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import replace
from typing import Any

import pytest
import standardwebhooks
from prometheus_client import CollectorRegistry
from yarl import URL

from app_api import repository, webhooks
from app_api.callback_guard import ResolvedTarget
from app_api.metrics import AppMetrics
from app_api.options import AppOptions
from app_api.records import WorkflowRecord
from app_api.signing import sign, signing_key, webhook_headers
from app_api.webhooks import WebhookDispatcher, retry_wait_s
from core_base.adapters.db_sqlite import SqliteDatabase
from core_base.adapters.kv_memory import MemoryStore
from core_base.adapters.storage_files import FileStorage
from core_base.constants import HTTP_TIMEOUT_S
from core_base.dev import DEFAULT_DEV_WEBHOOK_SECRET
from core_base.domain import Kind
from core_base.errors import SettingsError, UnavailableError
from core_base.http.client import HttpClient
from tests.app_api.support import (
    FAST,
    WEBHOOK_KEY,
    WEBHOOK_SECRET,
    Fake,
    Harness,
    Hook,
    app_settings,
    eventually,
    put_audio,
    running_app,
    succeeded,
    verify_standard_webhook,
)


async def finish(app: Harness, body: dict[str, Any] | None = None) -> str:
    response = await app.call(body or {"user_id": "u1", "prompt": "rain"})
    assert response.status_code == 202, response.text
    task_id: str = response.json()["task_id"]
    output = await put_audio(app.storage, task_id, Kind.SOUND)
    assert (await app.callback(succeeded(task_id, Kind.SOUND, output))).status_code == 200
    return task_id


async def delivery(app: Harness, task_id: str) -> dict[str, Any]:
    rows = await app.rows("SELECT * FROM app_webhook_deliveries WHERE task_id = $1", task_id)
    assert len(rows) == 1
    return rows[0]


async def test_500_three_times_then_204_is_delivered_once_with_a_stable_id(
    db: SqliteDatabase, kv: MemoryStore, storage: FileStorage, subservice: Fake, receiver: Hook
) -> None:
    hook, hook_url = receiver
    hook.statuses = [500, 500, 500, 204]
    settings = app_settings(audio_gen_api_url=subservice[1], marketplace_callback=hook_url)
    async with running_app(settings, db=db, kv=kv, storage=storage) as app:
        task_id = await finish(app)

        async def delivered() -> bool:
            return bool((await delivery(app, task_id))["status"] == "delivered")

        await eventually(delivered, what="delivery")
        row = await delivery(app, task_id)
        assert row["attempts"] == 4 and row["last_status_code"] == 204
        assert len(hook.received) == 4 and hook.successes() == 1
        ids = {headers["webhook-id"] for headers, _ in hook.received}
        assert ids == {row["id"]}
        for headers, body in hook.received:
            assert verify_standard_webhook(headers, body, WEBHOOK_KEY)
            assert headers["content-type"] == "application/json"
        # Done means done: another round sends nothing.
        await app.app.state.ctx.webhooks.run_once()
        await app.app.state.ctx.webhooks.wait_idle()
        assert len(hook.received) == 4


async def test_a_restart_resumes_a_pending_delivery(
    db: SqliteDatabase, kv: MemoryStore, storage: FileStorage, subservice: Fake, receiver: Hook
) -> None:
    hook, hook_url = receiver
    hook.statuses = [503]
    settings = app_settings(audio_gen_api_url=subservice[1], marketplace_callback=hook_url)
    async with running_app(settings, db=db, kv=kv, storage=storage) as first:
        task_id = await finish(first)
        await eventually(lambda: _true(len(hook.received) >= 1), what="first attempt")
    row = await delivery(first, task_id)
    assert row["status"] == "pending" and row["attempts"] >= 1
    attempts_before = len(hook.received)

    hook.statuses = [503] * attempts_before + [204]
    async with running_app(settings, db=db, kv=kv, storage=storage) as second:

        async def delivered() -> bool:
            return bool((await delivery(second, task_id))["status"] == "delivered")

        await eventually(delivered, what="resumed delivery")
        assert hook.successes() == 1
        assert {headers["webhook-id"] for headers, _ in hook.received} == {row["id"]}
        assert await second.rows("SELECT task_id FROM app_stats") == [{"task_id": task_id}]


async def test_delivery_gives_up_after_max_age(
    db: SqliteDatabase, kv: MemoryStore, storage: FileStorage, subservice: Fake, receiver: Hook
) -> None:
    hook, hook_url = receiver
    hook.statuses = [500]
    options = AppOptions(**{**FAST.__dict__, "webhook_max_age_s": 1.0})
    settings = app_settings(audio_gen_api_url=subservice[1], marketplace_callback=hook_url)
    async with running_app(settings, db=db, kv=kv, storage=storage, options=options) as app:
        task_id = await finish(app)

        async def given_up() -> bool:
            return bool((await delivery(app, task_id))["status"] == "failed")

        await eventually(given_up, what="give-up")
        row = await delivery(app, task_id)
        assert row["attempts"] >= 2 and row["last_error"] == "HTTP 500"


async def test_a_receiver_answering_410_gone_is_not_retried(
    db: SqliteDatabase, kv: MemoryStore, storage: FileStorage, subservice: Fake, receiver: Hook
) -> None:
    hook, hook_url = receiver
    hook.statuses = [410, 204]
    settings = app_settings(audio_gen_api_url=subservice[1], marketplace_callback=hook_url)
    async with running_app(settings, db=db, kv=kv, storage=storage) as app:
        task_id = await finish(app)

        async def given_up() -> bool:
            return bool((await delivery(app, task_id))["status"] == "failed")

        await eventually(given_up, what="give-up")
        await app.app.state.ctx.webhooks.run_once()
        await app.app.state.ctx.webhooks.wait_idle()
    row = await delivery(app, task_id)
    assert row["attempts"] == 1 and row["last_status_code"] == 410
    assert len(hook.received) == 1


async def test_a_2xx_is_delivered_whatever_its_body(
    db: SqliteDatabase, kv: MemoryStore, storage: FileStorage, subservice: Fake, receiver: Hook
) -> None:
    """The receiver's status is its answer: a body larger than the client reads
    does not turn a 200 into a failed attempt to be sent again."""
    hook, hook_url = receiver
    hook.statuses, hook.answer = [200], b"x" * (5 * 1024 * 1024)
    settings = app_settings(audio_gen_api_url=subservice[1], marketplace_callback=hook_url)
    async with running_app(settings, db=db, kv=kv, storage=storage) as app:
        task_id = await finish(app)

        async def settled() -> bool:
            return bool((await delivery(app, task_id))["status"] != "pending")

        await eventually(settled, what="delivery")
    row = await delivery(app, task_id)
    assert (row["status"], row["attempts"], row["last_status_code"]) == ("delivered", 1, 200)
    assert len(hook.received) == 1


async def test_delivery_rechecks_the_address_and_refuses_a_private_one(
    db: SqliteDatabase,
    kv: MemoryStore,
    storage: FileStorage,
    subservice: Fake,
    receiver: Hook,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    hook, hook_url = receiver
    settings = app_settings(audio_gen_api_url=subservice[1], allow_private_callbacks=False)
    async with running_app(settings, db=db, kv=kv, storage=storage) as app:
        # The name does not resolve at call time, which is accepted.
        body = {"user_id": "u1", "prompt": "rain", "callback_url": "https://hooks.invalid/x"}
        response = await app.call(body)
        assert response.status_code == 202
        task_id = response.json()["task_id"]
        # Then it resolves to the receiver's private address (DNS rebinding).
        port = URL(hook_url).port
        resolve = socket.getaddrinfo

        def rebound(host: str, *args: Any, **kwargs: Any) -> Any:
            if host == "hooks.invalid":
                return [(socket.AF_INET, socket.SOCK_STREAM, 6, "", ("127.0.0.1", port))]
            return resolve(host, *args, **kwargs)

        monkeypatch.setattr(socket, "getaddrinfo", rebound)
        output = await put_audio(storage, task_id, Kind.SOUND)
        await app.callback(succeeded(task_id, Kind.SOUND, output))

        async def refused() -> bool:
            return bool((await delivery(app, task_id))["status"] == "failed")

        await eventually(refused, what="refusal")
        assert (await delivery(app, task_id))["last_error"].startswith("refused")
        assert hook.received == []


async def test_delivery_goes_to_the_checked_address_under_the_original_name(
    db: SqliteDatabase,
    kv: MemoryStore,
    storage: FileStorage,
    subservice: Fake,
    receiver: Hook,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The request is sent to the address the guard resolved and checked (no second
    lookup), with the callback URL's own name in ``Host``."""
    hook, hook_url = receiver
    port = URL(hook_url).port
    assert port is not None
    checked: list[str] = []

    async def resolve(url: str) -> ResolvedTarget:
        # DNS cannot be steered here: this "public" name resolves to the receiver.
        checked.append(url)
        return ResolvedTarget("hooks.example.com", port, [ipaddress.ip_address("127.0.0.1")])

    monkeypatch.setattr("app_api.webhooks.resolve_target", resolve)
    settings = app_settings(audio_gen_api_url=subservice[1], allow_private_callbacks=False)
    # The callback URL is set in the database behind the App API's back (the call
    # would refuse a plain-HTTP one): the App API must read the workflow back.
    reading = replace(FAST, remembered_workflows=0)
    async with running_app(settings, db=db, kv=kv, storage=storage, options=reading) as app:
        response = await app.call({"user_id": "u1", "prompt": "rain"})
        task_id = response.json()["task_id"]
        url = f"http://hooks.example.com:{port}/hook"
        await db.execute(
            "UPDATE app_workflows SET callback_url = $2 WHERE task_id = $1", task_id, url
        )
        output = await put_audio(storage, task_id, Kind.SOUND)
        await app.callback(succeeded(task_id, Kind.SOUND, output))
        await eventually(lambda: _true(hook.successes() == 1), what="delivery")
    headers, body = hook.received[0]
    assert checked == [url]
    assert headers["host"] == f"hooks.example.com:{port}"
    assert verify_standard_webhook(headers, body, WEBHOOK_KEY)


async def test_the_operators_marketplace_callback_is_trusted(
    db: SqliteDatabase, kv: MemoryStore, storage: FileStorage, subservice: Fake, receiver: Hook
) -> None:
    hook, hook_url = receiver
    settings = app_settings(
        audio_gen_api_url=subservice[1],
        allow_private_callbacks=False,
        marketplace_callback=hook_url,
    )
    async with running_app(settings, db=db, kv=kv, storage=storage) as app:
        await finish(app)
        await eventually(lambda: _true(hook.successes() == 1), what="delivery")


async def test_no_callback_url_means_no_delivery(
    db: SqliteDatabase, kv: MemoryStore, storage: FileStorage, subservice: Fake
) -> None:
    settings = app_settings(audio_gen_api_url=subservice[1])
    async with running_app(settings, db=db, kv=kv, storage=storage) as app:
        task_id = await finish(app)
        assert await app.rows("SELECT id FROM app_webhook_deliveries") == []
        assert (await app.result(task_id))["status"] == "succeeded"


def test_signature_matches_an_independent_computation() -> None:
    body = b'{"task_id":"t"}'
    expected = base64.b64encode(
        hmac.new(WEBHOOK_KEY, b"msg_1.1700000000." + body, hashlib.sha256).digest()
    ).decode()
    assert sign(WEBHOOK_KEY, "msg_1", 1700000000, body) == f"v1,{expected}"


def test_secret_formats() -> None:
    assert signing_key("whsec_" + base64.b64encode(b"\x00\x01key").decode()) == b"\x00\x01key"
    assert signing_key("whsec_AAFrZXk") == b"\x00\x01key"  # unpadded base64
    assert signing_key("plain secret") == b"plain secret"
    for bad in ("whsec_not*base64", "whsec_AAFrZ"):
        with pytest.raises(SettingsError, match="WEBHOOK_SECRET"):
            signing_key(bad)


@pytest.mark.parametrize(
    ("service_secret", "receiver_secret"),
    [
        (WEBHOOK_SECRET, WEBHOOK_SECRET),
        ("whsec_AAFrZXk", "whsec_AAFrZXk"),
        (DEFAULT_DEV_WEBHOOK_SECRET, DEFAULT_DEV_WEBHOOK_SECRET),
        # A plain secret: the receiver's library is given it as the README says.
        ("3f1c" * 16, "whsec_" + base64.b64encode(b"3f1c" * 16).decode()),
    ],
)
def test_the_reference_library_verifies_our_signatures(
    service_secret: str, receiver_secret: str
) -> None:
    """``standardwebhooks``, as a receiver would use it, given the string the
    README tells the receiver to use."""
    body = b'{"task_id":"t","status":"succeeded"}'
    now = int(time.time())
    headers = webhook_headers(signing_key(service_secret), "msg_1", now, body)
    assert standardwebhooks.Webhook(receiver_secret).verify(body, headers) == json.loads(body)


async def _true(value: bool) -> bool:
    return value


async def retry_waits(
    db: SqliteDatabase,
    kv: MemoryStore,
    storage: FileStorage,
    subservice: Fake,
    receiver: Hook,
    *,
    jitter: float,
    uniform: Callable[[], float],
) -> list[float]:
    """Five failed retries of one delivery (attempts 2..6, base 5 s, cap 30 s) on
    a clock of the test's: how long each was told to wait. Each attempt carries
    the timestamp of its own attempt (receivers refuse stale ones) and a valid
    signature."""
    hook, hook_url = receiver
    hook.statuses = [500]
    settings = app_settings(audio_gen_api_url=subservice[1], marketplace_callback=hook_url)
    # The app's own dispatcher makes the first attempt and puts the next one far off.
    far = replace(FAST, webhook_backoff_base_s=1e6, webhook_backoff_cap_s=1e6)
    async with running_app(settings, db=db, kv=kv, storage=storage, options=far) as app:
        task_id = await finish(app)
        await eventually(lambda: _true(len(hook.received) == 1), what="first attempt")
    first = await delivery(app, task_id)

    now = float(first["next_attempt_at"]) + 0.5
    options = replace(
        FAST,
        webhook_backoff_base_s=5.0,
        webhook_backoff_cap_s=30.0,
        webhook_backoff_jitter=jitter,
        webhook_max_age_s=1e9,
    )
    http = HttpClient()

    async def render(_: object) -> bytes:
        return b'{"rendered": true}'

    dispatcher = WebhookDispatcher(
        db,
        http,
        AppMetrics(CollectorRegistry()),
        options,
        key=WEBHOOK_KEY,
        render=render,
        allow_private=True,
        clock=lambda: now,
        uniform=uniform,
    )
    waits, stamps = [], []
    try:
        for _ in range(5):
            assert await dispatcher.run_once() == 1
            await dispatcher.wait_idle()
            row = await delivery(app, task_id)
            waits.append(float(row["next_attempt_at"]) - now)
            stamps.append(int(hook.received[-1][0]["webhook-timestamp"]))
            assert stamps[-1] == int(now)
            now = float(row["next_attempt_at"]) + 0.5
    finally:
        await http.aclose()
    assert len(set(stamps)) == 5
    for headers, body in hook.received[1:]:
        assert verify_standard_webhook(headers, body, WEBHOOK_KEY)
    return waits


async def test_retries_back_off_exponentially_to_the_cap_and_each_attempt_is_signed_afresh(
    db: SqliteDatabase, kv: MemoryStore, storage: FileStorage, subservice: Fake, receiver: Hook
) -> None:
    """Without jitter each retry waits base * 2**(n-1), at most the cap."""
    waits = await retry_waits(
        db, kv, storage, subservice, receiver, jitter=0.0, uniform=lambda: 0.5
    )
    assert waits == [10.0, 20.0, 30.0, 30.0, 30.0]  # attempts 2..6: 5 * 2**(n-1), cap 30


async def test_retry_waits_are_jittered_below_the_schedule(
    db: SqliteDatabase, kv: MemoryStore, storage: FileStorage, subservice: Fake, receiver: Hook
) -> None:
    """Deliveries that failed together must not come back as one wave: each wait
    is the schedule's less up to the jitter fraction, as the random draw says,
    and never more than the schedule (the cap stays the longest wait)."""
    draws = iter([0.0, 0.5, 0.999, 0.25, 0.75])
    waits = await retry_waits(
        db, kv, storage, subservice, receiver, jitter=0.2, uniform=lambda: next(draws)
    )
    expected = [10.0, 20.0 * 0.9, 30.0 * (1 - 0.2 * 0.999), 30.0 * 0.95, 30.0 * 0.85]
    assert waits == pytest.approx(expected)


def test_production_jitter_spreads_retries_of_one_attempt_number() -> None:
    """With the defaults and a real random source, a thousand deliveries failing
    their first attempt together are spread over a fifth of the first wait."""
    options = AppOptions()
    waits = [retry_wait_s(1, options, random.random()) for _ in range(1000)]
    base = options.webhook_backoff_base_s
    assert all(base * (1 - options.webhook_backoff_jitter) <= w <= base for w in waits)
    assert max(waits) - min(waits) > 0.9 * base * options.webhook_backoff_jitter


@asynccontextmanager
async def silent_receiver() -> AsyncIterator[str]:
    """A receiver that takes connections and never answers."""

    async def hold(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while await reader.read(65536):  # until the client gives up and hangs up
            pass
        writer.close()

    server = await asyncio.start_server(hold, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        yield f"http://127.0.0.1:{port}/hook"
    finally:
        server.close()


async def delivery_row(db: SqliteDatabase, delivery_id: str) -> dict[str, Any]:
    row = await db.fetchrow("SELECT * FROM app_webhook_deliveries WHERE id = $1", delivery_id)
    assert row is not None
    return row


async def pending_delivery(
    db: SqliteDatabase, url: str, now: float, *, due_at: float | None = None
) -> str:
    """A finished workflow's delivery, due at ``due_at`` (default ``now``; later:
    leased to its writer until then)."""
    task_id = str(uuid.uuid4())
    record = WorkflowRecord(
        task_id=task_id, user_id="u1", kinds=[Kind.SOUND], callback_url=url,
        created_at=now, updated_at=now,
    )  # fmt: skip
    async with db.transaction() as tx:
        await repository.insert_workflow(tx, record, fanout_at=now + 3600)
    delivery_id = str(uuid.uuid4())
    await repository.insert_delivery(
        db, delivery_id, task_id, url, record.model_dump_json(), now, next_attempt_at=due_at
    )
    return delivery_id


def four_slot_dispatcher(db: SqliteDatabase, http: HttpClient) -> WebhookDispatcher:
    """A dispatcher with 4 attempts at once, 2 per host, a 60 s lease; bodies "{}"."""
    options = replace(FAST, webhook_concurrency=4, webhook_per_host=2, webhook_lease_s=60.0)

    async def render(record: Any) -> bytes:
        return b"{}"

    return WebhookDispatcher(
        db, http, AppMetrics(CollectorRegistry()), options,
        key=WEBHOOK_KEY, render=render, allow_private=True,
    )  # fmt: skip


async def test_a_receiver_that_never_answers_holds_its_share_not_every_slot(
    db: SqliteDatabase, receiver: Hook
) -> None:
    """Claims are taken only to be sent at once, at most webhook_per_host to one
    host: the silent receiver's attempts wait for their timeout while another
    client's webhook goes out in the same round, and nothing claimed waits in a
    queue past its lease (where another replica would claim and send it too)."""
    hook, hook_url = receiver
    now = time.time()
    http = HttpClient(timeout_s=2.0)
    dispatcher = four_slot_dispatcher(db, http)
    async with silent_receiver() as silent_url:
        stuck = [await pending_delivery(db, silent_url, now - 10) for _ in range(6)]
        healthy = await pending_delivery(db, hook_url, now - 1)
        try:
            assert await dispatcher.run_once() == 3  # two to the silent host, one healthy
            await eventually(lambda: _true(len(hook.received) == 1), what="the healthy webhook")
            leased = await db.fetch(
                "SELECT id FROM app_webhook_deliveries"
                " WHERE status = 'pending' AND next_attempt_at > $1",
                time.time() + HTTP_TIMEOUT_S + 1,
            )
            assert {row["id"] for row in leased} == set(stuck[:2])

            async def healthy_delivered() -> bool:
                return bool((await delivery_row(db, healthy))["status"] == "delivered")

            await eventually(healthy_delivered, what="the healthy delivery recorded")
            assert await dispatcher.run_once() == 0  # the silent host has its share
        finally:
            await dispatcher.close()
            await http.aclose()


async def test_a_backlog_for_a_host_that_never_answers_does_not_hide_other_hosts(
    db: SqliteDatabase, receiver: Hook, monkeypatch: pytest.MonkeyPatch
) -> None:
    """More overdue deliveries to a silent host than a round reads: those its host
    has no slot for are put back a little, so the next round reaches the webhook of
    another client that fell due after all of them."""
    monkeypatch.setattr(webhooks, "_BATCH", 5)
    hook, hook_url = receiver
    now = time.time()
    http = HttpClient(timeout_s=5.0)
    dispatcher = four_slot_dispatcher(db, http)
    async with silent_receiver() as silent_url:
        for _ in range(12):
            await pending_delivery(db, silent_url, now - 10)
        healthy = await pending_delivery(db, hook_url, now - 1)
        try:
            assert await dispatcher.run_once() == 2  # the silent host's share
            assert await dispatcher.run_once() == 0  # five more of its rows put back
            assert await dispatcher.run_once() == 1  # the healthy one, among the rest
            await eventually(lambda: _true(len(hook.received) == 1), what="the healthy webhook")
            assert hook.received[0][0]["webhook-id"] == healthy
        finally:
            await dispatcher.close()
            await http.aclose()


@asynccontextmanager
async def running_dispatcher(db: SqliteDatabase) -> AsyncIterator[WebhookDispatcher]:
    """:func:`four_slot_dispatcher` on a client of its own, closed afterwards."""
    http = HttpClient(timeout_s=5.0)
    dispatcher = four_slot_dispatcher(db, http)
    try:
        yield dispatcher
    finally:
        await dispatcher.close()
        await http.aclose()


def record_failing(
    monkeypatch: pytest.MonkeyPatch, failures: int, *, written: bool = False
) -> list[dict[str, Any]]:
    """Make recording an attempt fail ``failures`` times as a dropped database
    connection does (``written``: after the write took effect, its answer lost);
    returns the outcomes recorded since."""
    real_record = repository.record_delivery_attempt
    left, recorded = [failures], []

    async def record(db: Any, delivery_id: str, **outcome: Any) -> None:
        if left[0]:
            left[0] -= 1
            if written:
                await real_record(db, delivery_id, **outcome)
            raise UnavailableError("PostgreSQL unreachable: ConnectionDoesNotExistError")
        recorded.append(outcome)
        await real_record(db, delivery_id, **outcome)

    monkeypatch.setattr(repository, "record_delivery_attempt", record)
    monkeypatch.setattr(webhooks, "_RECORD_RETRY_WAITS_S", (0.0, 0.0))
    return recorded


async def test_a_dropped_database_connection_does_not_send_a_delivered_webhook_again(
    db: SqliteDatabase, receiver: Hook, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The webhook went out but its outcome met a dropped connection: the outcome
    is recorded on the next try, so no lease runs out to send it a second time."""
    recorded = record_failing(monkeypatch, failures=2)
    hook, hook_url = receiver
    delivery_id = await pending_delivery(db, hook_url, time.time() - 1)
    async with running_dispatcher(db) as dispatcher:
        assert await dispatcher.run_once() == 1
        await eventually(lambda: _true(bool(recorded)), what="the outcome recorded")
        row = await delivery_row(db, delivery_id)
        assert (row["status"], row["attempts"]) == ("delivered", 1)
        assert len(hook.received) == 1


async def test_an_outcome_that_cannot_be_recorded_is_a_warning_and_due_again(
    db: SqliteDatabase,
    receiver: Hook,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A database outage outlasting the tries: one warning naming it (an outage is
    expected, no traceback), and the delivery stays pending under its lease."""
    record_failing(monkeypatch, failures=3)
    hook, hook_url = receiver
    delivery_id = await pending_delivery(db, hook_url, time.time() - 1)
    async with running_dispatcher(db) as dispatcher:
        with caplog.at_level(logging.WARNING, logger="app_api.webhooks"):
            assert await dispatcher.run_once() == 1
            await eventually(
                lambda: _true(any(delivery_id in r.getMessage() for r in caplog.records)),
                what="the outage logged",
            )
        (line,) = [r for r in caplog.records if delivery_id in r.getMessage()]
        assert line.levelno == logging.WARNING and line.exc_info is None
        assert "PostgreSQL unreachable" in line.getMessage()
        assert len(hook.received) == 1  # sent, but not known to be: it goes again
        row = await delivery_row(db, delivery_id)
        assert row["status"] == "pending" and row["next_attempt_at"] > time.time() + 30


async def test_an_outcome_written_but_not_answered_counts_its_attempt_once(
    db: SqliteDatabase, receiver: Hook, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The write of a failed attempt took effect but its answer was lost: writing
    it again (the retry) leaves one attempt counted, so the backoff skips no step."""
    recorded = record_failing(monkeypatch, failures=1, written=True)
    hook, hook_url = receiver
    hook.statuses = [500]
    delivery_id = await pending_delivery(db, hook_url, time.time() - 1)
    async with running_dispatcher(db) as dispatcher:
        assert await dispatcher.run_once() == 1
        await eventually(lambda: _true(bool(recorded)), what="the outcome written again")
        row = await delivery_row(db, delivery_id)
        assert (row["status"], row["attempts"], row["last_status_code"]) == ("pending", 1, 500)


async def submit_leased(
    dispatcher: WebhookDispatcher, db: SqliteDatabase, url: str, lease_s: float = 60
) -> str:
    """A new delivery written leased to this process for ``lease_s``, made at once
    from memory (as the App API does when it finishes a workflow)."""
    lease = time.time() + lease_s
    delivery_id = await pending_delivery(db, url, time.time(), due_at=lease)
    delivery = await repository.get_delivery(db, delivery_id)
    assert delivery is not None
    record = WorkflowRecord.model_validate_json(delivery.payload)
    dispatcher.submit_new(delivery, record, leased_until=lease)
    return delivery_id


async def test_a_stop_lets_an_attempt_under_way_finish(db: SqliteDatabase, receiver: Hook) -> None:
    """SIGTERM finishes what is in flight: the webhook goes out and its outcome
    is recorded, instead of being cancelled and sent again when its lease ends."""
    hook, hook_url = receiver
    async with running_dispatcher(db) as dispatcher:
        delivery_id = await submit_leased(dispatcher, db, hook_url)
        await dispatcher.close(grace_s=5.0)
    row = await delivery_row(db, delivery_id)
    assert (row["status"], row["attempts"]) == ("delivered", 1)
    assert len(hook.received) == 1


async def test_a_stop_hands_back_what_it_could_not_finish(db: SqliteDatabase) -> None:
    """An attempt still waiting for its receiver when the grace ends is handed
    back, due at once for another App API, not after its lease; a delivery whose
    lease another dispatcher has taken since is left to that one."""
    async with running_dispatcher(db) as dispatcher:
        async with silent_receiver() as silent_url:
            stuck = await submit_leased(dispatcher, db, silent_url)
            taken = await submit_leased(dispatcher, db, silent_url)
            others_lease = time.time() + 30
            await db.execute(
                "UPDATE app_webhook_deliveries SET next_attempt_at = $2 WHERE id = $1",
                taken,
                others_lease,
            )
            await asyncio.sleep(0.2)  # both requests under way
            await dispatcher.close(grace_s=0.2)
    row = await delivery_row(db, stuck)
    assert row["status"] == "pending" and row["next_attempt_at"] <= time.time()
    assert (await delivery_row(db, taken))["next_attempt_at"] == others_lease


async def test_a_new_delivery_with_every_slot_taken_goes_to_the_poll(db: SqliteDatabase) -> None:
    """Receivers slower than webhooks come: a new delivery with no free slot is
    handed back at once, not queued here past its lease (another App API would
    then claim and send it too); those under way keep their leases."""
    async with running_dispatcher(db) as dispatcher:
        async with silent_receiver() as silent_url:
            under_way = [await submit_leased(dispatcher, db, silent_url) for _ in range(4)]
            overflow = await submit_leased(dispatcher, db, silent_url)

            async def handed_back() -> bool:
                row = await delivery_row(db, overflow)
                return bool(row["next_attempt_at"] <= time.time())

            await eventually(handed_back, what="the fifth delivery handed back")
            for delivery_id in under_way:
                assert (await delivery_row(db, delivery_id))["next_attempt_at"] > time.time() + 30
            await dispatcher.close()


async def test_a_busy_hosts_backlog_is_put_back_until_the_next_round(db: SqliteDatabase) -> None:
    """Deliveries whose host has no free slot wait one poll interval, not as long as
    an attempt may take: a receiver answering in a second drains at its share of
    slots per second."""
    http = HttpClient(timeout_s=5.0)
    dispatcher = four_slot_dispatcher(db, http)
    now = time.time()
    try:
        async with silent_receiver() as silent_url:
            waiting = [await pending_delivery(db, silent_url, now - 10) for _ in range(3)]
            assert await dispatcher.run_once() == 2  # the host's share
            rows = [await delivery_row(db, delivery_id) for delivery_id in waiting]
            put_back = [row for row in rows if row["next_attempt_at"] < now + 30]
            assert len(put_back) == 1
            assert put_back[0]["next_attempt_at"] <= time.time() + FAST.poll_interval_s
            await dispatcher.close()
    finally:
        await http.aclose()


async def test_new_deliveries_without_a_slot_are_handed_back_together(
    db: SqliteDatabase, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A burst of finishes with every slot taken: one statement hands them back,
    not a task and a statement each (competing with the calls for connections)."""
    statements: list[int] = []
    real_release = repository.release_deliveries

    async def release(db: Any, leases: Any, now: float) -> int:
        statements.append(len(leases))
        return await real_release(db, leases, now)

    monkeypatch.setattr(repository, "release_deliveries", release)
    async with running_dispatcher(db) as dispatcher:
        async with silent_receiver() as silent_url:
            for _ in range(4):
                await submit_leased(dispatcher, db, silent_url)
            now = time.time()
            overflow = [
                await pending_delivery(db, silent_url, now, due_at=now + 60) for _ in range(10)
            ]
            deliveries = [await repository.get_delivery(db, d) for d in overflow]
            for delivery in deliveries:  # together, as while a hand-back is under way
                assert delivery is not None
                record = WorkflowRecord.model_validate_json(delivery.payload)
                dispatcher.submit_new(delivery, record, leased_until=now + 60)
            await eventually(lambda: _true(sum(statements) == 10), what="the hand-back")
            assert statements == [10]
            await dispatcher.close()


async def test_a_poll_leaves_alone_a_delivery_still_under_way_here(db: SqliteDatabase) -> None:
    """An attempt that outlasts its lease (a slow receiver): this process's own
    poll does not claim it again beside the attempt still waiting."""
    async with running_dispatcher(db) as dispatcher:
        async with silent_receiver() as silent_url:
            await submit_leased(dispatcher, db, silent_url, lease_s=-1)  # already run out
            await asyncio.sleep(0.1)
            assert await dispatcher.run_once() == 0
            await dispatcher.close()


async def test_the_marketplace_host_may_use_every_slot_but_one_share(db: SqliteDatabase) -> None:
    """MARKETPLACE_CALLBACK, where most webhooks go, drains a backlog with every
    slot but the share kept for the other hosts; another host gets its share."""
    http = HttpClient(timeout_s=5.0)
    options = replace(FAST, webhook_concurrency=6, webhook_per_host=2, webhook_lease_s=60.0)
    now = time.time()
    try:
        async with silent_receiver() as marketplace_url, silent_receiver() as client_url:

            async def render(record: Any) -> bytes:
                return b"{}"

            dispatcher = WebhookDispatcher(
                db, http, AppMetrics(CollectorRegistry()), options, key=WEBHOOK_KEY,
                render=render, allow_private=True, trusted_urls=frozenset({marketplace_url}),
            )  # fmt: skip
            for _ in range(6):
                await pending_delivery(db, marketplace_url, now - 10)
            for _ in range(3):
                await pending_delivery(db, client_url, now - 5)
            assert await dispatcher.run_once() == 6
            leased = await db.fetch(
                "SELECT url, count(*) AS n FROM app_webhook_deliveries"
                " WHERE next_attempt_at > $1 GROUP BY url",
                time.time() + 30,
            )
            assert {row["url"]: row["n"] for row in leased} == {marketplace_url: 4, client_url: 2}
            await dispatcher.close()
    finally:
        await http.aclose()


async def test_a_poll_round_under_way_when_the_stop_begins_claims_nothing_more(
    db: SqliteDatabase, receiver: Hook, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The stop comes while a round reads the due deliveries: it claims none of
    them (an attempt started then would outlive the stop's wait for attempts and
    be handed back while still under way: sent twice)."""
    hook, hook_url = receiver
    reading, resume = asyncio.Event(), asyncio.Event()
    real_due = repository.due_deliveries

    async def slow_due(db: Any, now: float, limit: int) -> list[tuple[str, str]]:
        due = await real_due(db, now, limit)
        reading.set()
        await resume.wait()
        return due

    monkeypatch.setattr(repository, "due_deliveries", slow_due)
    delivery_id = await pending_delivery(db, hook_url, time.time() - 1)
    async with running_dispatcher(db) as dispatcher:
        round_ = asyncio.create_task(dispatcher.run_once())
        await reading.wait()
        dispatcher.stop_claiming()
        resume.set()
        assert await round_ == 0
    row = await delivery_row(db, delivery_id)
    assert row["next_attempt_at"] <= time.time() and hook.received == []


async def test_a_hand_back_under_way_when_the_stop_comes_is_not_lost(
    db: SqliteDatabase, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A new delivery without a slot is being handed back, the database slow, when
    the stop comes: the stop's own hand-back takes it along, not drops it."""
    real_release = repository.release_deliveries
    calls = 0

    async def first_hangs(db: Any, leases: Any, now: float) -> int:
        nonlocal calls
        calls += 1
        if calls == 1:
            await asyncio.Event().wait()
        return await real_release(db, leases, now)

    monkeypatch.setattr(repository, "release_deliveries", first_hangs)
    async with running_dispatcher(db) as dispatcher:
        async with silent_receiver() as silent_url:
            under_way = [await submit_leased(dispatcher, db, silent_url) for _ in range(4)]
            overflow = await submit_leased(dispatcher, db, silent_url)
            await eventually(lambda: _true(calls == 1), what="the overflow's hand-back")
            dispatcher.stop_claiming()
            await dispatcher.hand_back()
    for delivery_id in [*under_way, overflow]:
        assert (await delivery_row(db, delivery_id))["next_attempt_at"] <= time.time()


async def test_a_delivery_after_the_stop_is_left_to_its_lease_and_said(
    db: SqliteDatabase, caplog: pytest.LogCaptureFixture
) -> None:
    """A request handler that outlived the server's drain finishes a workflow after
    the stop handed everything back: its webhook is logged as left to its lease."""
    async with running_dispatcher(db) as dispatcher:
        await dispatcher.close()
        with caplog.at_level(logging.WARNING, logger="app_api.webhooks"):
            late = await submit_leased(dispatcher, db, "http://127.0.0.1:9/hook")
    assert any(late in r.getMessage() for r in caplog.records)


async def test_a_delivery_claimed_as_the_stop_begins_is_handed_back_unsent(
    db: SqliteDatabase, receiver: Hook, monkeypatch: pytest.MonkeyPatch
) -> None:
    hook, hook_url = receiver
    real_claim = repository.claim_delivery
    stopping: list[WebhookDispatcher] = []

    async def claim_as_the_stop_begins(db: Any, delivery_id: str, now: float, until: float) -> bool:
        stopping[0].stop_claiming()
        return await real_claim(db, delivery_id, now, until)

    monkeypatch.setattr(repository, "claim_delivery", claim_as_the_stop_begins)
    delivery_id = await pending_delivery(db, hook_url, time.time() - 1)
    async with running_dispatcher(db) as dispatcher:
        stopping.append(dispatcher)
        assert await dispatcher.run_once() == 0
        assert (await delivery_row(db, delivery_id))["next_attempt_at"] > time.time() + 30
        await dispatcher.hand_back()
    assert (await delivery_row(db, delivery_id))["next_attempt_at"] <= time.time()
    assert hook.received == []
