"""The workflow end to end on embedded adapters: call, fan-out, callbacks,
result, stats record and webhook; idempotency; failures the client sees."""

from __future__ import annotations

import asyncio
import json
import logging
import re
import time
import uuid
from dataclasses import replace
from typing import Any
from urllib.parse import parse_qs, urlsplit

import numpy as np
import pytest

from app_api import reconcile, repository
from app_api.app import stop_taking_calls
from app_api.cache import WORKFLOW_KEY
from app_api.fanout import _span_s
from app_api.options import AppOptions
from app_api.records import WorkflowRecord
from app_api.subservices import SubServices
from core_base.adapters.db_sqlite import SqliteDatabase
from core_base.adapters.kv_memory import MemoryStore
from core_base.adapters.storage_files import FileStorage
from core_base.audio.encoding import encode
from core_base.contracts import MAX_BATCH_TASKS, AudioOutput, TaskResult
from core_base.domain import AudioFormat, Kind, TaskStatus
from core_base.errors import UnavailableError
from core_base.generation.models import GeneratedAudio
from core_base.generation.task_store import TaskStore
from tests.app_api.support import (
    AUTH,
    FAST,
    INTERNAL_TOKEN,
    WEBHOOK_KEY,
    Fake,
    FakeSubService,
    Harness,
    Hook,
    app_settings,
    eventually,
    put_audio,
    running_app,
    succeeded,
    verify_standard_webhook,
    webhook_payload,
)


def settings_for(subservice: Fake, receiver: Hook | None = None, **overrides: Any) -> Any:
    _, url = subservice
    values: dict[str, Any] = {"audio_gen_api_url": url, "music_gen_api_url": url}
    if receiver is not None:
        values["marketplace_callback"] = receiver[1]
    values.update(overrides)
    return app_settings(**values)


async def count(app: Harness, table: str, task_id: str) -> int:
    rows = await app.rows(f"SELECT COUNT(*) AS n FROM {table} WHERE task_id = $1", task_id)
    return int(rows[0]["n"])


async def test_the_defaults_reach_the_sub_service(
    db: SqliteDatabase, kv: MemoryStore, storage: FileStorage, subservice: Fake
) -> None:
    """SPEC §3: kinds ["sound"], duration 5, format wav."""
    fake, _ = subservice
    async with running_app(settings_for(subservice), db=db, kv=kv, storage=storage) as app:
        response = await app.call({"user_id": "u1", "prompt": "rain"})
        assert response.status_code == 202, response.text
        await eventually(lambda: _true(len(fake.requests) == 1), what="fan-out")
        view = await app.result(response.json()["task_id"])
    assert view["kinds"] == ["sound"] and [o["kind"] for o in view["outputs"]] == ["sound"]
    request = fake.requests[0]
    assert (request["duration"], request["format"]) == (5.0, "wav"), request


async def test_a_workflow_with_an_ended_kind_is_running_without_a_running_report(
    db: SqliteDatabase, kv: MemoryStore, storage: FileStorage, subservice: Fake
) -> None:
    """A short generation sends no running report: its kind goes from queued to
    succeeded. With the other kind still queued the workflow is under way, not
    queued."""
    fake, _ = subservice
    async with running_app(settings_for(subservice), db=db, kv=kv, storage=storage) as app:
        response = await app.call({"user_id": "u1", "prompt": "rain", "kinds": ["sound", "music"]})
        task_id = response.json()["task_id"]
        await eventually(lambda: _true(len(fake.requests) == 2), what="fan-out")
        assert (await app.result(task_id))["status"] == "queued"
        sound = await put_audio(storage, task_id, Kind.SOUND, b"sound-bytes")
        assert (await app.callback(succeeded(task_id, Kind.SOUND, sound))).status_code == 200
        view = await app.result(task_id)
    assert view["status"] == "running"
    assert [o["status"] for o in view["outputs"]] == ["succeeded", "queued"]


async def test_two_kinds_end_to_end(
    db: SqliteDatabase, kv: MemoryStore, storage: FileStorage, subservice: Fake, receiver: Hook
) -> None:
    fake, _ = subservice
    hook, hook_url = receiver
    async with running_app(settings_for(subservice), db=db, kv=kv, storage=storage) as app:
        response = await app.call(
            {
                "user_id": "u1",
                "prompt": "  lo-fi piano with soft drums ",
                "kinds": ["sound", "music"],
                "duration": 2.5,
                "seed": 7,
                "params": {"top_k": 50},
                "callback_url": hook_url,
            }
        )
        assert response.status_code == 202, response.text
        assert response.json()["status"] == "queued"
        task_id = response.json()["task_id"]

        await eventually(lambda: _true(len(fake.requests) == 2), what="fan-out")
        request = fake.requests[0]
        assert request["task_id"] == task_id
        assert request["prompt"] == "lo-fi piano with soft drums"
        assert request["seed"] == 7 and request["duration"] == 2.5
        assert request["params"]["top_k"] == 50
        assert request["callback_url"] == "http://app.test/internal/v1/callback"
        assert set(fake.auth) == {f"Bearer {INTERNAL_TOKEN}"}

        # Live progress comes from the sub-service's task record in Redis: a kind
        # the worker has started shows as running before its running report (a
        # short generation sends none).
        running = TaskResult(task_id=task_id, kind=Kind.SOUND, status=TaskStatus.RUNNING)
        store = TaskStore(kv, "audio_gen", 3600)
        await store.put(running)
        await store.set_progress(task_id, 0.4)
        view = await app.result(task_id)
        assert view["status"] == "running" and view["progress"] == 0.2
        assert [o["status"] for o in view["outputs"]] == ["running", "queued"]

        assert (await app.callback(running)).status_code == 200
        view = await app.result(task_id)
        assert view["status"] == "running"
        assert view["outputs"][0]["status"] == "running"

        await store.set_progress(task_id, 0.5)
        view = await app.result(task_id)
        assert view["progress"] == 0.25  # mean of sound 0.5 and music 0

        sound = await put_audio(storage, task_id, Kind.SOUND, b"sound-bytes")
        music = await put_audio(storage, task_id, Kind.MUSIC, b"music-bytes")
        # The worker's final record reaches Redis before its callback reaches the
        # App API: the kind has ended, and its progress must not fall back to 0.
        await store.put(succeeded(task_id, Kind.SOUND, sound))
        view = await app.result(task_id)
        assert view["status"] == "running" and view["progress"] == 0.5
        assert (await app.callback(succeeded(task_id, Kind.SOUND, sound))).status_code == 200
        assert (await app.result(task_id))["status"] == "running"
        assert (await app.callback(succeeded(task_id, Kind.MUSIC, music))).status_code == 200

        view = await app.result(task_id)
        assert view["status"] == "succeeded" and view["progress"] == 1.0
        assert view["error"] is None and view["completed_at"]
        assert [o["kind"] for o in view["outputs"]] == ["sound", "music"]
        first = view["outputs"][0]
        assert first["format"] == "wav" and first["duration"] == 2.5
        assert first["sample_rate"] == 16000 and first["channels"] == 1
        download = await app.client.get(first["url"].removeprefix("http://app.test"))
        assert download.status_code == 200 and download.content == b"sound-bytes"

        await eventually(lambda: _true(hook.successes() == 1), what="webhook")
        headers, body = hook.received[0]
        assert verify_standard_webhook(headers, body, WEBHOOK_KEY)
        assert headers["webhook-id"].startswith("msg_")
        payload = webhook_payload(body)
        assert payload["task_id"] == task_id and payload["status"] == "succeeded"
        assert payload["outputs"][1]["url"]
        assert await count(app, "app_stats", task_id) == 1


async def test_repeated_and_late_callbacks_change_nothing(
    db: SqliteDatabase, kv: MemoryStore, storage: FileStorage, subservice: Fake, receiver: Hook
) -> None:
    hook, _ = receiver
    async with running_app(
        settings_for(subservice, receiver), db=db, kv=kv, storage=storage
    ) as app:
        task_id = (await app.call({"user_id": "u1", "prompt": "rain"})).json()["task_id"]
        output = await put_audio(storage, task_id, Kind.SOUND)
        for _ in range(3):
            assert (await app.callback(succeeded(task_id, Kind.SOUND, output))).status_code == 200
        late = TaskResult(task_id=task_id, kind=Kind.SOUND, status=TaskStatus.RUNNING, progress=0.1)
        assert (await app.callback(late)).json() == {"changed": False}
        failed = TaskResult(task_id=task_id, kind=Kind.SOUND, status=TaskStatus.FAILED, error="x")
        assert (await app.callback(failed)).json() == {"changed": False}

        assert (await app.result(task_id))["status"] == "succeeded"
        await eventually(lambda: _true(hook.successes() == 1), what="webhook")
        assert await count(app, "app_stats", task_id) == 1
        assert await count(app, "app_webhook_deliveries", task_id) == 1
        assert await count(app, "app_workflow_outputs", task_id) == 1
        # Nothing else is sent later.
        await app.app.state.ctx.webhooks.run_once()
        await app.app.state.ctx.webhooks.wait_idle()
        assert len(hook.received) == 1


async def test_one_kind_failing_fails_the_workflow_but_keeps_the_other_output(
    db: SqliteDatabase, kv: MemoryStore, storage: FileStorage, subservice: Fake, receiver: Hook
) -> None:
    hook, _ = receiver
    async with running_app(
        settings_for(subservice, receiver), db=db, kv=kv, storage=storage
    ) as app:
        body = {"user_id": "u1", "prompt": "storm", "kinds": ["music", "sound"]}
        task_id = (await app.call(body)).json()["task_id"]
        output = await put_audio(storage, task_id, Kind.MUSIC)
        await app.callback(succeeded(task_id, Kind.MUSIC, output))
        await app.callback(
            TaskResult(
                task_id=task_id, kind=Kind.SOUND, status=TaskStatus.FAILED, error="model OOM"
            )
        )
        view = await app.result(task_id)
        assert view["status"] == "failed"
        assert view["error"] == "sound: model OOM"
        music, sound = view["outputs"]
        assert music["status"] == "succeeded" and music["url"]
        assert sound["status"] == "failed" and sound["url"] is None
        await eventually(lambda: _true(hook.successes() == 1), what="webhook")
        assert webhook_payload(hook.received[0][1])["error"] == "sound: model OOM"


async def test_a_canceled_kind_cancels_the_workflow_and_says_so(
    db: SqliteDatabase, kv: MemoryStore, storage: FileStorage, subservice: Fake
) -> None:
    async with running_app(settings_for(subservice), db=db, kv=kv, storage=storage) as app:
        task_id = (await app.call({"user_id": "u1", "prompt": "rain"})).json()["task_id"]
        canceled = TaskResult(task_id=task_id, kind=Kind.SOUND, status=TaskStatus.CANCELED)
        assert (await app.callback(canceled)).status_code == 200
        view = await app.result(task_id)
    assert view["status"] == "canceled"
    assert view["outputs"][0]["status"] == "canceled"
    assert view["outputs"][0]["error"] == "canceled"


async def test_result_urls_expire_after_presign_expires(
    db: SqliteDatabase, kv: MemoryStore, storage: FileStorage, subservice: Fake
) -> None:
    settings = settings_for(subservice, presign_expires=120)
    async with running_app(settings, db=db, kv=kv, storage=storage) as app:
        task_id = (await app.call({"user_id": "u1", "prompt": "rain"})).json()["task_id"]
        output = await put_audio(storage, task_id, Kind.SOUND)
        await app.callback(succeeded(task_id, Kind.SOUND, output))
        before = time.time()
        url = (await app.result(task_id))["outputs"][0]["url"]
    expires = int(parse_qs(urlsplit(url).query)["expires"][0])
    assert before + 119 <= expires <= time.time() + 121


async def test_same_idempotency_key_and_body_returns_the_same_task(
    db: SqliteDatabase, kv: MemoryStore, storage: FileStorage, subservice: Fake
) -> None:
    fake, _ = subservice
    async with running_app(settings_for(subservice), db=db, kv=kv, storage=storage) as app:
        body = {"user_id": "u1", "prompt": "rain"}
        key = {"Idempotency-Key": "order-42"}
        first = await app.call(body, key)
        second = await app.call({**body, "prompt": "  rain  "}, key)  # same after normalising
        assert first.status_code == second.status_code == 202
        assert first.json()["task_id"] == second.json()["task_id"]
        rows = await app.rows("SELECT task_id FROM app_workflows")
        assert len(rows) == 1
        conflict = await app.call({**body, "prompt": "snow"}, key)
        assert conflict.status_code == 422
        assert conflict.json()["detail"][0]["field"] == "Idempotency-Key"
        # The same key from another user is another request.
        other = await app.call({**body, "user_id": "u2"}, key)
        assert other.status_code == 202 and other.json()["task_id"] != first.json()["task_id"]
        await eventually(lambda: _true(len(fake.requests) == 2), what="fan-out")
        assert len(await app.rows("SELECT task_id FROM app_workflows")) == 2


async def test_unreachable_subservice_fails_the_workflow_visibly(
    db: SqliteDatabase, kv: MemoryStore, storage: FileStorage, receiver: Hook
) -> None:
    hook, hook_url = receiver
    # Nothing listens on port 9 (discard): every attempt is refused.
    settings = app_settings(marketplace_callback=hook_url)
    async with running_app(settings, db=db, kv=kv, storage=storage) as app:
        task_id = (await app.call({"user_id": "u1", "prompt": "rain"})).json()["task_id"]

        async def failed() -> bool:
            return bool((await app.result(task_id))["status"] == "failed")

        await eventually(failed, what="workflow failure")
        view = await app.result(task_id)
        assert "AudioGen unavailable" in view["error"]
        assert "AudioGen unavailable" in view["outputs"][0]["error"]
        await eventually(lambda: _true(hook.successes() == 1), what="webhook")
        assert webhook_payload(hook.received[0][1])["status"] == "failed"
        attempts = re.search(r"after (\d+) attempts", view["error"])
        assert attempts is not None and int(attempts.group(1)) >= 2


async def test_an_unexpected_error_on_a_kinds_path_fails_it_at_the_deadline(
    db: SqliteDatabase,
    kv: MemoryStore,
    storage: FileStorage,
    subservice: Fake,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A bug on the path (a kind with no sub-service URL: KeyError) counted no
    attempt: the task stayed queued, retried at every lease, for ever."""

    async def broken(*args: object, **kwargs: object) -> None:
        raise KeyError("speech")

    monkeypatch.setattr(SubServices, "submit_many", broken)
    async with running_app(settings_for(subservice), db=db, kv=kv, storage=storage) as app:
        task_id = (await app.call({"user_id": "u1", "prompt": "rain"})).json()["task_id"]
        await eventually(lambda: _status_is(app, task_id, "failed"), what="the kind failed")
        (output,) = (await app.result(task_id))["outputs"]
        assert "AudioGen unavailable after" in output["error"]
        assert "internal error (KeyError; see the App API's log)" in output["error"]


async def test_an_unexpected_error_after_the_submit_leaves_the_task_to_its_lease(
    db: SqliteDatabase,
    kv: MemoryStore,
    storage: FileStorage,
    subservice: Fake,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The sub-service may hold the tasks by then: no attempt is counted (which
    sent them again at once, or failed them past the deadline while they ran)."""
    fake, _ = subservice
    mark = repository.mark_dispatched_many
    failures = [RuntimeError("a bug after the submit")]

    async def mark_once_failing(*args: Any, **kwargs: Any) -> None:
        if failures:
            raise failures.pop()
        await mark(*args, **kwargs)

    monkeypatch.setattr(repository, "mark_dispatched_many", mark_once_failing)
    async with running_app(settings_for(subservice), db=db, kv=kv, storage=storage) as app:
        task_id = (await app.call({"user_id": "u1", "prompt": "rain"})).json()["task_id"]
        await eventually(lambda: _true(not failures), what="the failing mark")
        # Many fan-out rounds and backoffs (20-100 ms here) later: sent once.
        await asyncio.sleep(1.0)
        assert [r["task_id"] for r in fake.requests] == [task_id]
        rows = await app.rows("SELECT fanout_attempts FROM app_workflow_outputs")
        assert [int(row["fanout_attempts"]) for row in rows] == [0]
        assert (await app.result(task_id))["status"] == "queued"


async def test_a_sub_service_down_is_logged_once_naming_its_address(
    db: SqliteDatabase, kv: MemoryStore, storage: FileStorage, caplog: pytest.LogCaptureFixture
) -> None:
    """Not a line per waiting task and retry, nor per batch (a batch goes out every
    round): with thousands waiting, or for hours, that is a flood."""
    async with running_app(app_settings(), db=db, kv=kv, storage=storage) as app:
        with caplog.at_level(logging.WARNING, logger="app_api.fanout"):
            for i in range(5):
                await app.call({"user_id": "u1", "prompt": f"rain {i}"})

            async def retried() -> bool:
                rows = await app.rows("SELECT fanout_attempts FROM app_workflow_outputs")
                return all(int(row["fanout_attempts"]) >= 2 for row in rows)

            # Its retry backoff, on a loaded machine too.
            await eventually(retried, timeout_s=30, what="two attempts each")
    attempts = sum(int(r["fanout_attempts"]) for r in await app.rows(
        "SELECT fanout_attempts FROM app_workflow_outputs"
    ))  # fmt: skip
    lines = [r.getMessage() for r in caplog.records if "not accepted by" in r.getMessage()]
    assert attempts >= 10  # retried in several rounds, and batches
    assert len(lines) == 1, lines  # within the first 30 s
    assert "AudioGen task(s) not accepted by http://127.0.0.1:9" in lines[0]


async def test_a_database_outage_mid_fan_out_is_a_warning_without_traceback(
    db: SqliteDatabase,
    kv: MemoryStore,
    storage: FileStorage,
    subservice: Fake,
    caplog: pytest.LogCaptureFixture,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """An outage is expected: one line naming it, not an ERROR with a traceback per
    batch. The task still goes out (its lease runs out and it is due again)."""
    real_mark = repository.mark_dispatched_many
    outage = [True]

    async def mark_once_down(*args: Any, **kwargs: Any) -> None:
        if outage.pop() if outage else False:
            raise UnavailableError("PostgreSQL unreachable: connection reset")
        await real_mark(*args, **kwargs)

    monkeypatch.setattr(repository, "mark_dispatched_many", mark_once_down)
    async with running_app(settings_for(subservice), db=db, kv=kv, storage=storage) as app:
        with caplog.at_level(logging.WARNING, logger="app_api.fanout"):
            await app.call({"user_id": "u1", "prompt": "rain"})
            await eventually(lambda: _true(not outage), what="the outage met")
    (line,) = [r for r in caplog.records if "fan-out of" in r.getMessage()]
    assert line.levelno == logging.WARNING and line.exc_info is None
    assert "PostgreSQL unreachable" in line.getMessage()


async def test_a_sub_service_accepting_again_is_logged_once(
    db: SqliteDatabase,
    kv: MemoryStore,
    storage: FileStorage,
    subservice: Fake,
    caplog: pytest.LogCaptureFixture,
) -> None:
    fake, _ = subservice
    fake.status = 503
    async with running_app(settings_for(subservice), db=db, kv=kv, storage=storage) as app:
        with caplog.at_level(logging.INFO, logger="app_api.fanout"):
            await app.call({"user_id": "u1", "prompt": "rain"})
            await eventually(
                lambda: _true(any("not accepted" in r.getMessage() for r in caplog.records)),
                what="the refusal logged",
            )
            fake.status = 202
            await eventually(
                lambda: _true(any("accepts tasks again" in r.getMessage() for r in caplog.records)),
                what="the recovery logged",
            )
            await app.call({"user_id": "u1", "prompt": "rain again"})
            await asyncio.sleep(0.3)
    again = [r.getMessage() for r in caplog.records if "accepts tasks again" in r.getMessage()]
    assert again == ["fan-out: AudioGen accepts tasks again"]


async def test_tasks_waiting_out_a_backoff_go_as_soon_as_the_sub_service_accepts_again(
    db: SqliteDatabase, kv: MemoryStore, storage: FileStorage, subservice: Fake
) -> None:
    """After an outage the tasks refused during it are not left to their backoff (up
    to the cap) while new ones pass them: the first accepted batch brings them on."""
    fake, _ = subservice
    fake.status = 503
    slow_backoff = replace(FAST, fanout_backoff_base_s=25.0, fanout_backoff_cap_s=25.0)
    async with running_app(
        settings_for(subservice), db=db, kv=kv, storage=storage, options=slow_backoff
    ) as app:
        calls = [await app.call({"user_id": "u1", "prompt": f"rain {i}"}) for i in range(2)]
        waiting = [call.json()["task_id"] for call in calls]
        await eventually(lambda: _true(len(fake.requests) == 2), what="both refused once")
        fake.status = 202
        await app.call({"user_id": "u1", "prompt": "snow"})

        async def handed_on() -> bool:
            rows = await app.rows(
                "SELECT task_id FROM app_workflow_outputs WHERE dispatched_at IS NOT NULL"
            )
            return set(waiting) <= {row["task_id"] for row in rows}

        await eventually(handed_on, what="the waiting tasks handed on")


async def test_a_stored_request_that_no_longer_passes_fails_its_kind_saying_why(
    db: SqliteDatabase, kv: MemoryStore, storage: FileStorage, subservice: Fake
) -> None:
    """A workflow written by an older version, under other rules: its kind fails
    with the field named, its batch-mates go on (it failed the whole batch with a
    traceback every lease, and stayed queued for hours)."""
    fake, _ = subservice
    now = time.time()
    old, fine = str(uuid.uuid4()), str(uuid.uuid4())
    stored = {old: {"prompt": "rain", "duration": "5"}, fine: {"prompt": "rain"}}
    async with running_app(settings_for(subservice), db=db, kv=kv, storage=storage) as app:
        for task_id, request in stored.items():
            record = WorkflowRecord(
                task_id=task_id, user_id="u1", kinds=[Kind.SOUND], request=request,
                created_at=now, updated_at=now,
            )  # fmt: skip
            async with db.transaction() as tx:
                await repository.insert_workflow(tx, record, fanout_at=now)
        app.app.state.ctx.fanout.poll_soon()
        await eventually(lambda: _true(len(fake.requests) == 1), what="the valid task handed on")
        assert fake.requests[0]["task_id"] == fine
        await eventually(lambda: _status_is(app, old, "failed"), what="the invalid request failed")
        (output,) = (await app.result(old))["outputs"]
        assert "duration" in output["error"] and "AudioGen" in output["error"]


async def _status_is(app: Harness, task_id: str, status: str) -> bool:
    return bool((await app.result(task_id))["status"] == status)


async def test_subservice_refusal_fails_the_kind_without_retrying(
    db: SqliteDatabase, kv: MemoryStore, storage: FileStorage, subservice: Fake
) -> None:
    fake, _ = subservice
    fake.status = 422
    async with running_app(settings_for(subservice), db=db, kv=kv, storage=storage) as app:
        task_id = (await app.call({"user_id": "u1", "prompt": "rain"})).json()["task_id"]

        async def failed() -> bool:
            return bool((await app.result(task_id))["status"] == "failed")

        await eventually(failed, what="workflow failure")
        assert "AudioGen refused the task: HTTP 422: nope" in (await app.result(task_id))["error"]
        assert len(fake.requests) == 1


async def test_new_workflows_fan_out_in_one_batch_request_per_kind(
    db: SqliteDatabase, kv: MemoryStore, storage: FileStorage, subservice: Fake
) -> None:
    fake, _ = subservice
    async with running_app(settings_for(subservice), db=db, kv=kv, storage=storage) as app:
        ctx = app.app.state.ctx
        await ctx.loops["fanout"].stop()  # dispatched by hand below, all in one round
        body = {"user_id": "u1", "prompt": "rain", "kinds": ["sound", "music"]}
        task_ids = {(await app.call(body)).json()["task_id"] for _ in range(10)}
        assert fake.requests == []

        assert await ctx.fanout.run_once() == 20
        assert fake.batches == [10, 10]
        assert sorted(r["task_id"] for r in fake.requests) == sorted([*task_ids, *task_ids])
        rows = await app.rows("SELECT dispatched_at FROM app_workflow_outputs")
        assert len(rows) == 20 and all(row["dispatched_at"] is not None for row in rows)


async def test_a_burst_larger_than_a_batch_goes_out_in_full_requests_at_once(
    db: SqliteDatabase, kv: MemoryStore, storage: FileStorage, subservice: Fake
) -> None:
    fake, _ = subservice
    async with running_app(settings_for(subservice), db=db, kv=kv, storage=storage) as app:
        ctx = app.app.state.ctx
        await ctx.loops["fanout"].stop()  # dispatched by hand below, all in one round
        for _ in range(MAX_BATCH_TASKS * 2 + 30):
            assert (await app.call({"user_id": "u1", "prompt": "rain"})).status_code == 202

        assert await ctx.fanout.run_once() == MAX_BATCH_TASKS * 2 + 30
        assert sorted(fake.batches) == [30, MAX_BATCH_TASKS, MAX_BATCH_TASKS]
        rows = await app.rows("SELECT dispatched_at FROM app_workflow_outputs")
        assert all(row["dispatched_at"] is not None for row in rows)


async def test_subservice_without_the_batch_route_gets_tasks_one_by_one(
    db: SqliteDatabase, kv: MemoryStore, storage: FileStorage, subservice: Fake
) -> None:
    fake, _ = subservice
    fake.batch_route = False  # an older sub-service during a rolling upgrade
    async with running_app(settings_for(subservice), db=db, kv=kv, storage=storage) as app:
        body = {"user_id": "u1", "prompt": "rain", "kinds": ["sound", "music"]}
        task_id = (await app.call(body)).json()["task_id"]

        async def dispatched() -> bool:
            rows = await app.rows("SELECT dispatched_at FROM app_workflow_outputs")
            return all(row["dispatched_at"] is not None for row in rows)

        await eventually(dispatched, what="dispatch")
        assert fake.batches == []
        assert [r["task_id"] for r in fake.requests] == [task_id, task_id]


@pytest.mark.parametrize("refused", ["each task", "the whole batch"])
async def test_overloaded_subservice_is_retried_until_it_accepts(
    db: SqliteDatabase, kv: MemoryStore, storage: FileStorage, subservice: Fake, refused: str
) -> None:
    fake, _ = subservice
    if refused == "each task":
        fake.status = 503
    else:
        fake.batch_status = 503
    options = AppOptions(**{**FAST.__dict__, "fanout_deadline_s": 60.0})
    async with running_app(
        settings_for(subservice), db=db, kv=kv, storage=storage, options=options
    ) as app:
        task_id = (await app.call({"user_id": "u1", "prompt": "rain"})).json()["task_id"]
        await eventually(lambda: _true(len(fake.requests) >= 2), what="retries")
        fake.status, fake.batch_status = 202, None

        async def dispatched() -> bool:
            rows = await app.rows("SELECT dispatched_at FROM app_workflow_outputs")
            return rows[0]["dispatched_at"] is not None

        await eventually(dispatched, what="dispatch")
        view = await app.result(task_id)
        assert view["status"] == "queued" and view["outputs"][0]["error"] is None


async def test_redis_miss_falls_back_to_postgres(
    db: SqliteDatabase, kv: MemoryStore, storage: FileStorage, subservice: Fake
) -> None:
    async with running_app(settings_for(subservice), db=db, kv=kv, storage=storage) as app:
        task_id = (await app.call({"user_id": "u1", "prompt": "rain"})).json()["task_id"]
        output = await put_audio(storage, task_id, Kind.SOUND)
        await app.callback(succeeded(task_id, Kind.SOUND, output))
        key = WORKFLOW_KEY.format(task_id=task_id)
        assert await kv.get(key) is not None
        await kv.delete(key)
        view = await app.result(task_id)
        assert view["status"] == "succeeded" and view["outputs"][0]["url"]
        cached = await kv.get(key)
        assert cached is not None and json.loads(cached)["status"] == "succeeded"


async def test_a_terminal_cached_result_is_served_without_the_database(
    db: SqliteDatabase, kv: MemoryStore, storage: FileStorage, subservice: Fake
) -> None:
    async with running_app(settings_for(subservice), db=db, kv=kv, storage=storage) as app:
        task_id = (await app.call({"user_id": "u1", "prompt": "rain"})).json()["task_id"]
        output = await put_audio(storage, task_id, Kind.SOUND)
        await app.callback(succeeded(task_id, Kind.SOUND, output))
        await app.result(task_id)
        await db.execute(
            "UPDATE app_workflows SET user_id = 'tampered' WHERE task_id = $1", task_id
        )
        assert (await app.result(task_id))["user_id"] == "u1"


async def test_overload_is_503_with_retry_after(
    db: SqliteDatabase, kv: MemoryStore, storage: FileStorage, subservice: Fake
) -> None:
    settings = settings_for(subservice, max_queue_depth=2)
    async with running_app(settings, db=db, kv=kv, storage=storage) as app:
        for _ in range(2):
            assert (await app.call({"user_id": "u1", "prompt": "rain"})).status_code == 202
        response = await app.call({"user_id": "u1", "prompt": "rain"})
        assert response.status_code == 503
        assert int(response.headers["retry-after"]) > 0
        # An idempotent replay of an accepted call is still answered.
        key = {"Idempotency-Key": "k1"}
        await db.execute("UPDATE app_workflows SET status = 'succeeded'")
        # The count is refreshed from the database in the background (a soft limit);
        # refresh it now rather than wait for the loop.
        await app.app.state.ctx.backlog.refresh()
        first = await app.call({"user_id": "u1", "prompt": "snow"}, key)
        assert first.status_code == 202
        await app.call({"user_id": "u1", "prompt": "snow"})
        assert (await app.call({"user_id": "u1", "prompt": "x"})).status_code == 503
        replay = await app.call({"user_id": "u1", "prompt": "snow"}, key)
        assert replay.status_code == 202 and replay.json() == first.json()


async def test_calls_arriving_together_cannot_all_pass_the_overload_check(
    db: SqliteDatabase, kv: MemoryStore, storage: FileStorage, subservice: Fake
) -> None:
    """A burst: every call is checked before any insert is done. The ones under
    way count, so no more than the limit are accepted; the rest are told to retry."""
    settings = settings_for(subservice, max_queue_depth=3)
    async with running_app(settings, db=db, kv=kv, storage=storage) as app:
        answers = await asyncio.gather(
            *(app.call({"user_id": "u1", "prompt": f"rain {n}"}) for n in range(30))
        )
        statuses = [response.status_code for response in answers]
        assert 1 <= statuses.count(202) <= 3, statuses
        assert statuses.count(503) == 30 - statuses.count(202), statuses
        rows = await db.fetch("SELECT task_id FROM app_workflows")
        assert len(rows) == statuses.count(202)
        assert app.app.state.ctx.backlog.active == statuses.count(202)


async def test_reconciler_applies_a_lost_callback(
    db: SqliteDatabase, kv: MemoryStore, storage: FileStorage, subservice: Fake, receiver: Hook
) -> None:
    fake, _ = subservice
    hook, _ = receiver
    options = AppOptions(**{**FAST.__dict__, "reconcile_stale_after_s": 0.2})
    settings = settings_for(subservice, receiver)
    async with running_app(settings, db=db, kv=kv, storage=storage, options=options) as app:
        task_id = (await app.call({"user_id": "u1", "prompt": "rain"})).json()["task_id"]
        await eventually(lambda: _true(len(fake.requests) == 1), what="fan-out")
        output = await put_audio(storage, task_id, Kind.SOUND)
        fake.tasks[task_id] = succeeded(task_id, Kind.SOUND, output)  # callback never sent

        async def done() -> bool:
            return bool((await app.result(task_id))["status"] == "succeeded")

        await eventually(done, what="reconciliation")
        await eventually(lambda: _true(hook.successes() == 1), what="webhook")


async def test_reconciler_goes_on_past_kinds_whose_sub_service_is_down(
    db: SqliteDatabase,
    kv: MemoryStore,
    storage: FileStorage,
    subservice: Fake,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Stale kinds it cannot look up go to the back of the line: with more of them
    than a round takes, the others (a lost music callback) are still reconciled."""
    monkeypatch.setattr(reconcile, "_BATCH", 2)
    fake, _ = subservice
    options = AppOptions(**{**FAST.__dict__, "reconcile_stale_after_s": 0.2})
    async with running_app(
        settings_for(subservice), db=db, kv=kv, storage=storage, options=options
    ) as app:
        sounds = [
            (await app.call({"user_id": "u1", "prompt": f"rain {i}"})).json()["task_id"]
            for i in range(3)
        ]
        music = (await app.call({"user_id": "u1", "prompt": "piano", "kinds": ["music"]})).json()
        await eventually(lambda: _true(len(fake.requests) == 4), what="fan-out")
        fake.unavailable_tasks.update(sounds)
        output = await put_audio(storage, music["task_id"], Kind.MUSIC)
        fake.tasks[music["task_id"]] = succeeded(music["task_id"], Kind.MUSIC, output)

        async def music_done() -> bool:
            return bool((await app.result(music["task_id"]))["status"] == "succeeded")

        await eventually(music_done, what="the music kind reconciled")
        assert {(await app.result(t))["status"] for t in sounds} == {"queued"}


async def test_reconciler_refans_a_task_the_subservice_lost(
    db: SqliteDatabase, kv: MemoryStore, storage: FileStorage, subservice: Fake
) -> None:
    fake, _ = subservice
    options = AppOptions(**{**FAST.__dict__, "reconcile_stale_after_s": 0.2})
    async with running_app(
        settings_for(subservice), db=db, kv=kv, storage=storage, options=options
    ) as app:
        await app.call({"user_id": "u1", "prompt": "rain"})
        await eventually(lambda: _true(len(fake.requests) >= 2), what="second fan-out")
        assert fake.requests[0] == fake.requests[1]


async def test_reconciler_leaves_a_running_task_the_subservice_lost_to_its_worker(
    db: SqliteDatabase, kv: MemoryStore, storage: FileStorage, subservice: Fake
) -> None:
    """A task store that lost a running task's record (Redis restarted without its
    data) does not send the task back to ``queued`` nor run it a second time: its
    worker still holds its message, and its result arrives later."""
    fake, _ = subservice
    options = AppOptions(**{**FAST.__dict__, "reconcile_stale_after_s": 0.2})
    async with running_app(
        settings_for(subservice), db=db, kv=kv, storage=storage, options=options
    ) as app:
        task_id = (await app.call({"user_id": "u1", "prompt": "rain"})).json()["task_id"]
        await eventually(lambda: _true(len(fake.requests) == 1), what="fan-out")
        running = TaskResult(
            task_id=task_id, kind=Kind.SOUND, status=TaskStatus.RUNNING, progress=0.4
        )
        assert (await app.callback(running)).status_code == 200

        await eventually(lambda: _true(fake.lookups.count(task_id) >= 3), what="lookups")
        view = await app.result(task_id)
        assert len(fake.requests) == 1
        assert (view["status"], view["outputs"][0]["status"]) == ("running", "running")
        assert view["progress"] == pytest.approx(0.4)

        output = await put_audio(storage, task_id, Kind.SOUND)
        await app.callback(succeeded(task_id, Kind.SOUND, output))
        assert (await app.result(task_id))["status"] == "succeeded"


def _flac(seconds: float = 2.0) -> bytes:
    return encode(
        GeneratedAudio(np.zeros((2, round(seconds * 16_000)), dtype=np.float32), 16_000),
        AudioFormat.FLAC,
    )


def _reconciling(grace_s: float) -> AppOptions:
    """Stale kinds looked up at once; stored audio taken after ``grace_s``."""
    return AppOptions(
        **{**FAST.__dict__, "reconcile_stale_after_s": 0.2, "stored_result_grace_s": grace_s}
    )


async def _flac_task(app: Harness, fake: FakeSubService, duration: float, *, running: bool) -> str:
    """A sound call in flac, fanned out; ``running``: its worker said so."""
    call = {"user_id": "u1", "prompt": "rain", "format": "flac", "duration": duration}
    task_id: str = (await app.call(call)).json()["task_id"]
    await eventually(lambda: _true(len(fake.requests) == 1), what="fan-out")
    if running:
        report = TaskResult(task_id=task_id, kind=Kind.SOUND, status=TaskStatus.RUNNING)
        assert (await app.callback(report)).status_code == 200
    return task_id


async def test_reconciler_takes_a_lost_result_from_the_stored_audio(
    db: SqliteDatabase, kv: MemoryStore, storage: FileStorage, subservice: Fake, receiver: Hook
) -> None:
    """The worker finished (audio stored, result recorded, message acked) but its
    callbacks gave up while the App API was out of reach, and the sub-service's
    task store then lost its data: the stored audio is the only news there will
    be. Unreadable audio (a stranger's object under the key) is not taken."""
    fake, _ = subservice
    hook, _ = receiver
    settings = settings_for(subservice, receiver)
    options = _reconciling(grace_s=0.5)
    async with running_app(settings, db=db, kv=kv, storage=storage, options=options) as app:
        task_id = await _flac_task(app, fake, 2, running=True)
        key = f"audio/{task_id}/sound.flac"
        await storage.put(key, b"not audio", content_type="audio/flac")
        await eventually(lambda: _true(fake.lookups.count(task_id) >= 3), what="lookups")
        assert (await app.result(task_id))["status"] == "running"

        data = _flac()
        await storage.put(key, data, content_type="audio/flac")

        async def done() -> bool:
            return bool((await app.result(task_id))["status"] == "succeeded")

        await eventually(done, what="reconciliation from the stored audio")
        output = (await app.result(task_id))["outputs"][0]
        assert (output["format"], output["duration"], output["sample_rate"]) == ("flac", 2.0, 16000)
        assert (output["channels"], output["bytes"]) == (2, len(data))
        await eventually(lambda: _true(hook.successes() == 1), what="webhook")
        assert len(fake.requests) == 1, "not generated again"


async def test_a_lost_queued_task_whose_audio_is_stored_is_not_generated_again(
    db: SqliteDatabase, kv: MemoryStore, storage: FileStorage, subservice: Fake
) -> None:
    """A short task goes from queued to its result without a running report: its
    stored audio says it ran, so it is not fanned out again but finished from it."""
    fake, _ = subservice
    async with running_app(
        settings_for(subservice), db=db, kv=kv, storage=storage, options=_reconciling(0.3)
    ) as app:
        task_id = await _flac_task(app, fake, 1, running=False)
        await storage.put(f"audio/{task_id}/sound.flac", _flac(1.0), content_type="audio/flac")

        async def done() -> bool:
            return bool((await app.result(task_id))["status"] == "succeeded")

        await eventually(done, what="reconciliation from the stored audio")
        assert len(fake.requests) == 1, "fanned out again"


async def test_within_the_grace_the_workers_own_late_callback_wins(
    db: SqliteDatabase, kv: MemoryStore, storage: FileStorage, subservice: Fake
) -> None:
    """The worker may still be retrying its callback, which says what stored audio
    cannot (the seed used, the model): the stored audio waits its grace."""
    fake, _ = subservice
    async with running_app(
        settings_for(subservice), db=db, kv=kv, storage=storage, options=_reconciling(600.0)
    ) as app:
        task_id = await _flac_task(app, fake, 2, running=True)
        key = f"audio/{task_id}/sound.flac"
        data = _flac()
        await storage.put(key, data, content_type="audio/flac")
        await eventually(lambda: _true(fake.lookups.count(task_id) >= 3), what="lookups")
        assert (await app.result(task_id))["status"] == "running"

        output = AudioOutput(
            key=key,
            format=AudioFormat.FLAC,
            duration=2.0,
            sample_rate=16_000,
            channels=2,
            bytes=len(data),
            generation={"backend": "synth", "seed": 123},
        )
        assert (await app.callback(succeeded(task_id, Kind.SOUND, output))).status_code == 200
        view = (await app.result(task_id))["outputs"][0]
        assert view["status"] == "succeeded" and view["generation"]["seed"] == 123
        assert len(fake.requests) == 1


async def test_hard_deadline_fails_what_never_finished(
    db: SqliteDatabase, kv: MemoryStore, storage: FileStorage, subservice: Fake
) -> None:
    options = AppOptions(**{**FAST.__dict__, "workflow_hard_deadline_s": 0.3})
    async with running_app(
        settings_for(subservice), db=db, kv=kv, storage=storage, options=options
    ) as app:
        task_id = (await app.call({"user_id": "u1", "prompt": "rain"})).json()["task_id"]

        async def failed() -> bool:
            return bool((await app.result(task_id))["status"] == "failed")

        await eventually(failed, what="deadline")
        assert "did not finish within" in (await app.result(task_id))["error"]
        assert await count(app, "app_stats", task_id) == 1


async def _true(value: bool) -> bool:
    return value


async def test_a_cancel_ends_the_workflow_canceled_with_one_webhook_and_stats_record(
    db: SqliteDatabase, kv: MemoryStore, storage: FileStorage, subservice: Fake, receiver: Hook
) -> None:
    fake, _ = subservice
    hook, hook_url = receiver
    async with running_app(settings_for(subservice), db=db, kv=kv, storage=storage) as app:
        body = {"user_id": "u1", "prompt": "rain", "kinds": ["sound", "music"]}
        task_id = (await app.call({**body, "callback_url": hook_url})).json()["task_id"]
        await eventually(lambda: _true(len(fake.requests) == 2), what="fan-out")
        sound = await put_audio(storage, task_id, Kind.SOUND)
        await app.callback(succeeded(task_id, Kind.SOUND, sound))

        response = await app.client.post(f"/v1/cancel/{task_id}", headers=AUTH)

        assert response.status_code == 200, response.text
        view = response.json()
        assert view["status"] == "canceled"
        outputs = {o["kind"]: o for o in view["outputs"]}
        assert outputs["sound"]["status"] == "succeeded" and outputs["sound"]["url"]
        assert outputs["music"]["status"] == "canceled"
        assert outputs["music"]["error"] == "canceled by the client"
        assert fake.canceled == [task_id]  # only the kind still running
        assert (await app.result(task_id))["status"] == "canceled"
        await eventually(lambda: _true(len(hook.received) == 1), what="webhook")
        assert webhook_payload(hook.received[0][1])["status"] == "canceled"

        # A repeated cancel is answered as the first (and asks the sub-service again,
        # in case the first one failed on its way); a late result changes nothing.
        again = await app.client.post(f"/v1/cancel/{task_id}", headers=AUTH)
        assert (again.status_code, again.json()["status"]) == (200, "canceled")
        assert fake.canceled == [task_id, task_id]
        music = await put_audio(storage, task_id, Kind.MUSIC)
        await app.callback(succeeded(task_id, Kind.MUSIC, music))
        assert (await app.result(task_id))["status"] == "canceled"
        stats = (await app.client.get("/v1/stats/u1", headers=AUTH)).json()
        assert (stats["total"], stats["canceled"], stats["succeeded"]) == (1, 1, 0)
        assert await count(app, "app_webhook_deliveries", task_id) == 1
        assert len(hook.received) == 1


async def test_cancel_answers_404_for_no_such_task_and_409_once_it_has_ended(
    db: SqliteDatabase, kv: MemoryStore, storage: FileStorage, subservice: Fake
) -> None:
    fake, _ = subservice
    async with running_app(settings_for(subservice), db=db, kv=kv, storage=storage) as app:
        task_id = (await app.call({"user_id": "u1", "prompt": "rain"})).json()["task_id"]
        await app.callback(
            succeeded(task_id, Kind.SOUND, await put_audio(storage, task_id, Kind.SOUND))
        )

        late = await app.client.post(f"/v1/cancel/{task_id}", headers=AUTH)
        assert late.status_code == 409, late.text
        assert late.json()["error"] == "conflict" and "succeeded" in late.json()["message"]
        assert (await app.result(task_id))["status"] == "succeeded"
        for unknown in (str(uuid.uuid4()), "not-a-task-id"):
            missing = await app.client.post(f"/v1/cancel/{unknown}", headers=AUTH)
            assert missing.status_code == 404, missing.text
        anonymous = await app.client.post(f"/v1/cancel/{task_id}")
        assert anonymous.status_code == 401
        assert fake.canceled == []


async def test_a_task_the_sub_service_holds_is_not_failed_at_the_fanout_deadline(
    db: SqliteDatabase, kv: MemoryStore, storage: FileStorage, subservice: Fake
) -> None:
    """A submit that went through while its answer was lost (a timeout), then
    refusals until the deadline: the sub-service holds the task, so the kind is
    taken as dispatched, not failed while its worker runs it."""
    fake, _ = subservice
    fake.status = 503
    async with running_app(settings_for(subservice), db=db, kv=kv, storage=storage) as app:
        task_id = (await app.call({"user_id": "u1", "prompt": "rain"})).json()["task_id"]
        fake.tasks[task_id] = TaskResult(task_id=task_id, kind=Kind.SOUND, status=TaskStatus.QUEUED)
        await eventually(lambda: _true(task_id in fake.lookups), timeout_s=10, what="the lookup")
        await asyncio.sleep(0.2)  # rounds after the deadline change nothing

        view = await app.result(task_id)
        assert (view["status"], view["outputs"][0]["error"]) == ("queued", None)
        rows = await app.rows(
            "SELECT dispatched_at FROM app_workflow_outputs WHERE task_id = $1", task_id
        )
        assert rows[0]["dispatched_at"] is not None
        await app.callback(
            succeeded(task_id, Kind.SOUND, await put_audio(storage, task_id, Kind.SOUND))
        )
        assert (await app.result(task_id))["status"] == "succeeded"


def test_a_fan_out_retry_span_reads_as_one_delay_when_all_are_equal() -> None:
    assert _span_s([8.0, 8.0]) == "8.0s"
    assert _span_s([0.5, 8.0, 2.0]) == "0.5-8.0s"


async def test_a_stopping_app_api_refuses_new_calls_but_answers_the_rest(
    db: SqliteDatabase, kv: MemoryStore, storage: FileStorage, subservice: Fake
) -> None:
    """dev stops taking calls while its workers finish (SPEC §6): a new call is a
    503 to retry, and readiness says so (a load balancer sends calls elsewhere); a
    replay of an accepted one, a callback and a read still answer."""
    async with running_app(settings_for(subservice), db=db, kv=kv, storage=storage) as app:
        key = {"Idempotency-Key": "before-the-stop"}
        accepted = await app.call({"user_id": "u1", "prompt": "rain"}, key)
        task_id = accepted.json()["task_id"]
        assert (await app.client.get("/readyz")).status_code == 200
        stop_taking_calls(app.app)

        ready = await app.client.get("/readyz")
        assert ready.status_code == 503 and ready.json()["status"] == "stopping"
        assert (await app.client.get("/healthz")).status_code == 200

        refused = await app.call({"user_id": "u1", "prompt": "snow"})
        assert refused.status_code == 503 and refused.json()["error"] == "unavailable"
        assert int(refused.headers["retry-after"]) > 0
        assert "shutting down" in refused.json()["message"]
        replay = await app.call({"user_id": "u1", "prompt": "rain"}, key)
        assert replay.status_code == 202 and replay.json() == accepted.json()
        output = await put_audio(storage, task_id, Kind.SOUND)
        assert (await app.callback(succeeded(task_id, Kind.SOUND, output))).status_code == 200
        assert (await app.result(task_id))["status"] == "succeeded"
    assert len(await db.fetch("SELECT task_id FROM app_workflows")) == 1
