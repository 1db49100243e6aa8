"""RETENTION_DAYS: finished workflows go with their audio and cached records; the
stats stay; a workflow still running, or whose webhook is still retried, stays."""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import shutil
import time
from collections.abc import Sequence
from functools import partial
from pathlib import Path
from typing import Any

import pytest
from prometheus_client import CollectorRegistry

from app_api import retention as retention_module
from app_api.cache import WORKFLOW_KEY, WorkflowCache
from app_api.metrics import AppMetrics
from app_api.retention import Retention
from core_base.adapters.db_sqlite import SqliteDatabase
from core_base.adapters.kv_memory import MemoryStore
from core_base.adapters.storage_files import FileStorage
from core_base.domain import Kind
from core_base.errors import NotDeletedError, UnavailableError
from tests.app_api.support import (
    AUTH,
    FAST,
    Fake,
    Harness,
    Hook,
    Receiver,
    app_settings,
    eventually,
    put_audio,
    running_app,
    serve,
    succeeded,
)

# Long enough to look at a result before it goes, on a busy machine too; the
# loop looks every 50 ms.
RETENTION_S = 3.0
OPTIONS = dataclasses.replace(FAST, retention_interval_s=0.05)


def settings(subservice: Fake, **overrides: Any) -> Any:
    _, url = subservice
    return app_settings(audio_gen_api_url=url, music_gen_api_url=url, **overrides)


async def finish(app: Harness, callback_url: str) -> str:
    response = await app.call({"user_id": "u1", "prompt": "rain", "callback_url": callback_url})
    assert response.status_code == 202, response.text
    task_id: str = response.json()["task_id"]
    output = await put_audio(app.storage, task_id, Kind.SOUND)
    assert (await app.callback(succeeded(task_id, Kind.SOUND, output))).status_code == 200
    return task_id


async def delivered(app: Harness, task_id: str) -> bool:
    """The webhook's delivery is recorded (the receiver has it a moment sooner)."""
    rows = await app.rows("SELECT status FROM app_webhook_deliveries WHERE task_id = $1", task_id)
    return [row["status"] for row in rows] == ["delivered"]


def an_hour_ahead(db: SqliteDatabase, storage: FileStorage, kv: MemoryStore) -> Retention:
    """A retention whose clock runs an hour ahead: whatever finished has expired."""
    return Retention(
        db,
        storage,
        WorkflowCache(kv, ttl_s=60),
        AppMetrics(CollectorRegistry()),
        retention_s=RETENTION_S,
        clock=lambda: time.time() + 3600,
    )


async def result_status(app: Harness, task_id: str) -> int:
    return (await app.client.get(f"/v1/result/{task_id}", headers=AUTH)).status_code


async def test_finished_workflows_go_with_their_audio_after_retention_days(
    db: SqliteDatabase, kv: MemoryStore, storage: FileStorage, subservice: Fake, receiver: Hook
) -> None:
    hook, hook_url = receiver
    failing = Receiver(statuses=[500])
    days = RETENTION_S / 86400
    async with (
        serve(failing.app()) as failing_url,
        running_app(
            settings(subservice, retention_days=days),
            db=db,
            kv=kv,
            storage=storage,
            options=OPTIONS,
        ) as app,
    ):
        gone = await finish(app, hook_url)
        await eventually(lambda: _true(hook.successes() == 1), what="the webhook")
        assert await result_status(app, gone) == 200  # cached as it is read
        assert await kv.get(WORKFLOW_KEY.format(task_id=gone)) is not None
        retried = await finish(app, f"{failing_url}/hook")
        running = (await app.call({"user_id": "u1", "prompt": "wind"})).json()["task_id"]

        async def deleted() -> bool:
            return await result_status(app, gone) == 404

        await eventually(deleted, timeout_s=RETENTION_S + 10, what="retention")
        assert not await storage.exists(f"audio/{gone}/sound.wav")
        assert await kv.get(WORKFLOW_KEY.format(task_id=gone)) is None
        # Its webhook is still being retried: the result it names stays.
        assert await result_status(app, retried) == 200
        assert await storage.exists(f"audio/{retried}/sound.wav")
        assert (await app.result(running))["status"] == "queued"
        stats = (await app.client.get("/v1/stats/u1", headers=AUTH)).json()
        assert (stats["total"], stats["succeeded"]) == (2, 2)  # the work still counts
        sound = stats["by_kind"]["sound"]
        assert (sound["total"], sound["succeeded"], sound["audio_seconds"]) == (2, 2, 5.0)
        metrics = (await app.client.get("/metrics")).text
        assert "app_workflows_deleted_total 1.0" in metrics


async def test_audio_uploaded_after_its_workflow_was_deleted_goes_too(
    db: SqliteDatabase, kv: MemoryStore, storage: FileStorage, subservice: Fake, receiver: Hook
) -> None:
    """A generation a cancel did not stop can outlive RETENTION_DAYS: its audio,
    uploaded once the workflow is gone, is deleted when its result comes, and the
    worker is answered (not a 404 it logs as an error). A task never seen here is
    still a 404, and its object is left alone."""
    _, hook_url = receiver
    async with running_app(
        settings(subservice, retention_days=RETENTION_S / 86400),
        db=db,
        kv=kv,
        storage=storage,
        options=OPTIONS,
    ) as app:
        response = await app.call({"user_id": "u1", "prompt": "rain", "callback_url": hook_url})
        task_id = response.json()["task_id"]
        assert (await app.client.post(f"/v1/cancel/{task_id}", headers=AUTH)).status_code == 200

        async def deleted() -> bool:
            return await result_status(app, task_id) == 404

        await eventually(deleted, timeout_s=RETENTION_S + 10, what="retention")
        late = await put_audio(storage, task_id, Kind.SOUND)  # the worker finishes
        answer = await app.callback(succeeded(task_id, Kind.SOUND, late))
        assert (answer.status_code, answer.json()) == (200, {"changed": False})
        assert not await storage.exists(late.key)

        stranger = "0b3a5e6c-6d1e-4e0b-9d55-2f3c1c7f0a11"
        other = await put_audio(storage, stranger, Kind.SOUND)
        assert (await app.callback(succeeded(stranger, Kind.SOUND, other))).status_code == 404
        assert await storage.exists(other.key)


async def test_retention_is_off_by_default(
    db: SqliteDatabase, kv: MemoryStore, storage: FileStorage, subservice: Fake, receiver: Hook
) -> None:
    _, hook_url = receiver
    async with running_app(
        settings(subservice), db=db, kv=kv, storage=storage, options=OPTIONS
    ) as app:
        assert app.app.state.ctx.settings.retention_days == 0
        assert "retention" not in app.app.state.ctx.loops
        task_id = await finish(app, hook_url)
        await asyncio.sleep(10 * OPTIONS.retention_interval_s)
        assert await result_status(app, task_id) == 200
        assert await storage.exists(f"audio/{task_id}/sound.wav")


async def _true(value: bool) -> bool:
    return value


class FlakyStorage(FileStorage):
    """File storage whose first ``delete_many`` fails, as an S3 outage would."""

    failures_left = 1

    async def delete_many(self, keys: Sequence[str]) -> None:
        if self.failures_left:
            self.failures_left -= 1
            raise UnavailableError("S3 unreachable: connection refused")
        await super().delete_many(keys)


async def test_a_round_that_cannot_delete_the_audio_leaves_the_rows_for_the_next(
    db: SqliteDatabase, kv: MemoryStore, tmp_path: Path, subservice: Fake, receiver: Hook
) -> None:
    _, hook_url = receiver
    storage = FlakyStorage(
        tmp_path / "files", public_base_url="http://app.test", signing_secret="s"
    )
    async with running_app(settings(subservice), db=db, kv=kv, storage=storage) as app:
        task_id = await finish(app, hook_url)
        await eventually(lambda: delivered(app, task_id), what="the webhook recorded delivered")
        retention = an_hour_ahead(db, storage, kv)
        with pytest.raises(UnavailableError):
            await retention.run_once()
        assert await result_status(app, task_id) == 200  # nothing half-deleted
        assert await retention.run_once() == 1
        assert await result_status(app, task_id) == 404
        assert not await storage.exists(f"audio/{task_id}/sound.wav")


async def two_finished_the_first_undeletable(
    app: Harness, storage: FileStorage, hook_url: str
) -> tuple[str, str, Path]:
    """Two finished workflows, the older one's audio undeletable (a directory where
    its file was: the store refuses it); returns both ids and that directory."""
    stuck, other = await finish(app, hook_url), await finish(app, hook_url)
    for task_id in (stuck, other):
        await eventually(partial(delivered, app, task_id), what="webhooks delivered")
    pinned = storage.path_for(f"audio/{stuck}/sound.wav")
    pinned.unlink()
    pinned.mkdir()
    (pinned / "inside").write_bytes(b"x")
    return stuck, other, pinned


async def test_audio_the_store_refuses_to_delete_keeps_its_workflow_only(
    db: SqliteDatabase,
    kv: MemoryStore,
    storage: FileStorage,
    subservice: Fake,
    receiver: Hook,
    caplog: pytest.LogCaptureFixture,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Objects that cannot be deleted (a permission, a lock) must not hold up every
    other workflow's deletion, round after round; not even a whole page of them
    (a page of one here), which oldest-first would otherwise serve again and again."""
    monkeypatch.setattr(retention_module, "_BATCH", 1)
    _, hook_url = receiver
    async with running_app(settings(subservice), db=db, kv=kv, storage=storage) as app:
        stuck, other, pinned = await two_finished_the_first_undeletable(app, storage, hook_url)
        retention = an_hour_ahead(db, storage, kv)
        with caplog.at_level(logging.WARNING, logger="app_api.retention"):
            assert await retention.run_once() == 1
        assert await result_status(app, other) == 404
        assert await result_status(app, stuck) == 200
        assert "keeping 1 workflow(s)" in caplog.text and stuck in caplog.text
        shutil.rmtree(pinned)  # someone fixed the store: the next round takes it
        assert await retention.run_once() == 1
        assert await result_status(app, stuck) == 404


async def test_more_kept_workflows_than_a_round_pages_through_hold_back_nothing(
    db: SqliteDatabase,
    kv: MemoryStore,
    storage: FileStorage,
    subservice: Fake,
    receiver: Hook,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A round of one page of one here: the next round goes on where this one ended,
    not from the oldest (kept) workflow again."""
    monkeypatch.setattr(retention_module, "_BATCH", 1)
    monkeypatch.setattr(retention_module, "_BATCHES_PER_ROUND", 1)
    _, hook_url = receiver
    async with running_app(settings(subservice), db=db, kv=kv, storage=storage) as app:
        _, other, _ = await two_finished_the_first_undeletable(app, storage, hook_url)
        retention = an_hour_ahead(db, storage, kv)
        assert await retention.run_once() == 0  # the stuck one, kept
        assert await retention.run_once() == 1  # the next one
        assert await result_status(app, other) == 404


class RefusingUnnamedStorage(FileStorage):
    """File storage whose store refuses a key it does not name (S3 may leave Key
    out of an error)."""

    async def delete_many(self, keys: Sequence[str]) -> None:
        await super().delete_many(keys[1:])
        raise NotDeletedError("S3 did not delete 1 object(s); first '': AccessDenied", [""])


async def test_a_refusal_that_names_no_workflow_of_the_batch_deletes_no_row(
    db: SqliteDatabase, kv: MemoryStore, tmp_path: Path, subservice: Fake, receiver: Hook
) -> None:
    """Whose object stayed cannot be told: every row stays, or one would go with
    its audio still in the bucket and nothing left that names it."""
    _, hook_url = receiver
    storage = RefusingUnnamedStorage(
        tmp_path / "files", public_base_url="http://app.test", signing_secret="s"
    )
    async with running_app(settings(subservice), db=db, kv=kv, storage=storage) as app:
        task_id = await finish(app, hook_url)
        await eventually(lambda: delivered(app, task_id), what="the webhook recorded delivered")
        assert await an_hour_ahead(db, storage, kv).run_once() == 0
        assert await result_status(app, task_id) == 200


async def test_a_record_cached_again_as_its_rows_went_is_cleared_next_round(
    db: SqliteDatabase, kv: MemoryStore, storage: FileStorage, subservice: Fake, receiver: Hook
) -> None:
    _, hook_url = receiver
    async with running_app(settings(subservice), db=db, kv=kv, storage=storage) as app:
        task_id = await finish(app, hook_url)
        await eventually(lambda: delivered(app, task_id), what="the webhook recorded delivered")
        retention = an_hour_ahead(db, storage, kv)
        assert await retention.run_once() == 1
        # A result read just before the rows went, writing the cache just after:
        key = WORKFLOW_KEY.format(task_id=task_id)
        await kv.set(key, b'{"stale": true}')
        assert await retention.run_once() == 0
        assert await kv.get(key) is None
