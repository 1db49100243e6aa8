"""A stopping App API (SIGTERM) finishes or hands back what it holds: fan-outs it
has not sent are due at once for another App API instead of after their lease.
(Webhooks: tests/app_api/test_webhooks.py.)"""

from __future__ import annotations

import asyncio
import time
from dataclasses import replace

from core_base.adapters.db_sqlite import SqliteDatabase
from core_base.adapters.kv_memory import MemoryStore
from core_base.adapters.storage_files import FileStorage
from tests.app_api.support import FAST, Fake, app_settings, eventually, running_app


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
