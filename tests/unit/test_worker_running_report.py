"""The worker's running callback waits RUNNING_REPORT_DELAY_S into a batch's
generation: a task done sooner is reported once, with its result; a longer one
is reported running first. The task store's running mark is written at once
either way. Real HTTP callbacks to a local receiver; embedded broker and store."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterator, Sequence
from pathlib import Path

import pytest

from core_base.adapters.broker_memory import MemoryBroker
from core_base.adapters.kv_memory import MemoryStore
from core_base.adapters.storage_files import FileStorage
from core_base.constants import RUNNING_REPORT_DELAY_S
from core_base.contracts import TaskMessage
from core_base.generation.task_store import task_key
from core_base.generation.worker import Worker
from core_base.settings import load_settings
from music_gen.service import SPEC
from tests.support.receiver import Receiver, run_receiver

# synth takes 50 steps per audio second.
STEPS_PER_AUDIO_S = 50


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    with run_receiver() as running:
        yield running


async def run_task(
    tmp_path: Path, receiver: Receiver, *, generation_s: float
) -> tuple[list[str], list[bytes]]:
    """One 0.5 s task whose generation takes about ``generation_s``; returns the
    statuses of its callbacks in arrival order, and the task store's records of
    it as the worker wrote them."""
    duration_s = 0.5
    step_delay_ms = 1000 * generation_s / (duration_s * STEPS_PER_AUDIO_S)
    settings = load_settings(
        SPEC.settings_class, internal_token="t", synth_step_delay_ms=step_delay_ms
    )
    broker = MemoryBroker()
    await broker.connect()
    kv = RecordingStore()
    storage = FileStorage(tmp_path, public_base_url="http://x", signing_secret="s")
    worker = Worker(SPEC, settings, broker=broker, kv=kv, storage=storage, manage_connections=False)
    running = asyncio.create_task(worker.run())
    queue = SPEC.queue(settings)
    await broker.declare(queue)
    message = TaskMessage(
        task_id="task-1",
        prompt="calm sea",
        duration=duration_s,
        kind=SPEC.kind,
        model="m",
        callback_url=f"{receiver.url}/callback",
    )
    await broker.publish(queue, message.to_bytes(), message_id="task-1")
    try:
        for _ in range(1000):
            statuses = [json.loads(r.body)["status"] for r in receiver.snapshot()]
            if "succeeded" in statuses:
                break
            await asyncio.sleep(0.01)
        await asyncio.sleep(RUNNING_REPORT_DELAY_S + 0.1)  # a late running report would be here
        return [json.loads(r.body)["status"] for r in receiver.snapshot()], kv.written
    finally:
        await worker.stop()
        await asyncio.wait_for(running, timeout=10)
        await broker.close()


class RecordingStore(MemoryStore):
    """The in-memory store, keeping every task record written, in order."""

    def __init__(self) -> None:
        super().__init__()
        self.written: list[bytes] = []

    async def set(self, key: str, value: bytes, *, ttl_s: float | None = None) -> None:
        self._record(key, value)
        await super().set(key, value, ttl_s=ttl_s)

    async def set_many(
        self, items: Sequence[tuple[str, bytes]], *, ttl_s: float | None = None
    ) -> None:
        for key, value in items:
            self._record(key, value)
        await super().set_many(items, ttl_s=ttl_s)

    def _record(self, key: str, value: bytes) -> None:
        if key == task_key(SPEC.name, "task-1"):
            self.written.append(value)


def statuses_of(records: list[bytes]) -> list[str]:
    return [json.loads(record)["status"] for record in records]


async def test_a_task_done_sooner_is_called_back_once_with_its_result(
    tmp_path: Path, receiver: Receiver
) -> None:
    statuses, records = await run_task(tmp_path, receiver, generation_s=0.0)

    assert statuses == ["succeeded"]
    assert statuses_of(records) == ["running", "succeeded"]


async def test_a_longer_task_is_called_back_running_then_with_its_result(
    tmp_path: Path, receiver: Receiver
) -> None:
    statuses, records = await run_task(
        tmp_path, receiver, generation_s=RUNNING_REPORT_DELAY_S + 0.5
    )

    assert statuses == ["running", "succeeded"]
    assert statuses_of(records) == ["running", "succeeded"]
