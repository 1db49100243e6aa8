"""A stopping App API (SIGTERM) finishes or hands back what it holds: fan-outs it
has not sent are due at once for another App API instead of after their lease;
it claims nothing more from the database meanwhile. (Webhooks' attempts:
tests/app_api/test_webhooks.py.)"""

from __future__ import annotations

import asyncio
import time
from dataclasses import replace
from typing import Any

import pytest

from app_api import fanout as fanout_module
from app_api import repository
from app_api.context import AppContext
from app_api.records import WorkflowRecord
from core_base.adapters.db_sqlite import SqliteDatabase
from core_base.adapters.kv_memory import MemoryStore
from core_base.adapters.storage_files import FileStorage
from core_base.domain import Kind
from tests.app_api.support import FAST, Fake, Hook, app_settings, eventually, running_app


async def _true(value: bool) -> bool:
    return value


async def test_a_stop_hands_back_fan_outs_not_sent_yet(
    db: SqliteDatabase, kv: MemoryStore, storage: FileStorage, subservice: Fake
) -> None:
    fake, url = subservice
    fake.hold = asyncio.Event()
    settings = app_settings(audio_gen_api_url=url)
    options = replace(FAST, stop_grace_s=0.2)
    body = {"user_id": "u1", "prompt": "rain", "kinds": ["sound"]}
    try:
        async with running_app(settings, db=db, kv=kv, storage=storage, options=options) as app:
            sent = (await app.call(body)).json()["task_id"]
            await eventually(lambda: _true(len(fake.requests) == 1), what="the first fan-out")
            # Held in memory behind the round that waits on the hung sub-service.
            waiting = [(await app.call(body)).json()["task_id"] for _ in range(3)]
    finally:
        fake.hold.set()
    rows = await db.fetch("SELECT task_id, next_fanout_at FROM app_workflow_outputs")
    due_at = {row["task_id"]: row["next_fanout_at"] for row in rows}
    assert all(due_at[task_id] <= time.time() for task_id in waiting), due_at
    # The one whose request was cut short keeps its lease: it may have been taken.
    assert due_at[sent] > time.time() + 10
    assert len(fake.requests) == 1


async def fanout_due_at(db: SqliteDatabase, task_id: str) -> float:
    """When a single-kind workflow's fan-out is due (or its lease ends)."""
    (output,) = await db.fetch(
        "SELECT next_fanout_at FROM app_workflow_outputs WHERE task_id = $1", task_id
    )
    return float(output["next_fanout_at"])


async def leftover_workflow(db: SqliteDatabase, callback_url: str | None = None) -> str:
    """A workflow another App API left behind: its fan-out due now."""
    now = time.time()
    record = WorkflowRecord(
        task_id=f"left-{time.monotonic_ns()}", user_id="u1", kinds=[Kind.SOUND],
        request={"prompt": "rain", "kinds": ["sound"]}, callback_url=callback_url,
        created_at=now - 60, updated_at=now - 60,
    )  # fmt: skip
    async with db.transaction() as tx:
        await repository.insert_workflow(tx, record, fanout_at=now - 30)
    return record.task_id


async def test_a_stopping_app_api_claims_no_more_work_from_the_database(
    db: SqliteDatabase, kv: MemoryStore, storage: FileStorage, subservice: Fake, receiver: Hook
) -> None:
    """Work a stopping App API would claim during its grace is cut short with a
    fresh lease (a rolling restart then delays it again): due fan-outs and
    webhooks are left to the App APIs that go on."""
    fake, url = subservice
    hook, hook_url = receiver
    settings = app_settings(audio_gen_api_url=url)
    async with running_app(settings, db=db, kv=kv, storage=storage) as app:
        ctx: AppContext = app.app.state.ctx
        ctx.fanout.stop_claiming()
        ctx.webhooks.stop_claiming()
        fan_out = await leftover_workflow(db)
        webhook = await leftover_workflow(db)
        await repository.insert_delivery(db, "msg-left", webhook, hook_url, "{}", time.time() - 1)
        await ctx.fanout.step()
        assert await ctx.webhooks.run_once() == 0
        await asyncio.sleep(5 * FAST.poll_interval_s)  # the loops' own rounds too
        assert fake.requests == [] and hook.received == []
        assert await fanout_due_at(db, fan_out) <= time.time()


async def test_a_fan_out_round_under_way_when_the_stop_begins_claims_nothing_more(
    db: SqliteDatabase,
    kv: MemoryStore,
    storage: FileStorage,
    subservice: Fake,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    fake, url = subservice
    reading, resume = asyncio.Event(), asyncio.Event()
    real_due = repository.due_fanouts

    async def slow_due(db: Any, now: float, limit: int) -> list[repository.FanoutJob]:
        due = await real_due(db, now, limit)
        if due:
            reading.set()
            await resume.wait()
        return due

    settings = app_settings(audio_gen_api_url=url)
    async with running_app(settings, db=db, kv=kv, storage=storage) as app:
        ctx: AppContext = app.app.state.ctx
        monkeypatch.setattr(repository, "due_fanouts", slow_due)
        left = await leftover_workflow(db)
        await reading.wait()  # the loop's round reads it
        ctx.fanout.stop_claiming()
        resume.set()
        await asyncio.sleep(5 * FAST.poll_interval_s)
        assert fake.requests == []
        assert await fanout_due_at(db, left) <= time.time()


async def test_a_stop_hands_back_new_fan_outs_still_waiting_for_a_request_slot(
    db: SqliteDatabase,
    kv: MemoryStore,
    storage: FileStorage,
    subservice: Fake,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A round cut short by the stop: the kind whose request is under way keeps
    its lease (it may have been taken), the one still waiting for a request slot
    is handed back with the rest."""
    monkeypatch.setattr(fanout_module, "_CONCURRENCY", 1)
    fake, url = subservice
    fake.hold = asyncio.Event()
    settings = app_settings(audio_gen_api_url=url, music_gen_api_url=url)
    options = replace(FAST, stop_grace_s=0.2)
    body = {"user_id": "u1", "prompt": "rain", "kinds": ["sound", "music"]}
    try:
        async with running_app(settings, db=db, kv=kv, storage=storage, options=options) as app:
            task_id = (await app.call(body)).json()["task_id"]
            await eventually(lambda: _true(len(fake.requests) == 1), what="one kind's request")
    finally:
        fake.hold.set()
    rows = await db.fetch(
        "SELECT kind, next_fanout_at FROM app_workflow_outputs WHERE task_id = $1", task_id
    )
    now = time.time()
    handed_back = [row["kind"] for row in rows if row["next_fanout_at"] <= now]
    leased = [row["kind"] for row in rows if row["next_fanout_at"] > now + 10]
    assert (len(handed_back), len(leased)) == (1, 1), rows
