"""The worker outlives dependency outages: a task store that is down for a while
delays a task without failing it or using up its attempts, and no error in a
batch ends the worker."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

from core_base.adapters.broker_memory import MemoryBroker
from core_base.adapters.kv_memory import MemoryStore
from core_base.adapters.storage_files import FileStorage
from core_base.backends.synth import SynthAdapter
from core_base.constants import QUEUE_DELIVERY_LIMIT
from core_base.contracts import TaskMessage
from core_base.errors import PermanentError, UnavailableError
from core_base.generation.task_store import task_key
from core_base.generation.worker import Worker
from core_base.settings import load_settings
from music_gen.service import SPEC


class FlakyStore(MemoryStore):
    """An in-memory store whose first ``outage`` calls raise ``error``."""

    def __init__(self, outage: int, error: Exception | None = None) -> None:
        super().__init__()
        self.outage = outage
        self.error = error or UnavailableError("Redis unreachable: connection closed by server")
        self.refused = 0

    async def _maybe_down(self) -> None:
        if self.refused < self.outage:
            self.refused += 1
            raise self.error

    async def get(self, key: str) -> bytes | None:
        await self._maybe_down()
        return await super().get(key)

    async def set(self, key: str, value: bytes, *, ttl_s: float | None = None) -> None:
        await self._maybe_down()
        await super().set(key, value, ttl_s=ttl_s)


async def run_one_task(tmp_path: Path, kv: MemoryStore, prompt: str = "calm sea") -> Any:
    settings = load_settings(SPEC.settings_class, internal_token="t")
    broker = MemoryBroker()
    await broker.connect()
    storage = FileStorage(tmp_path, public_base_url="http://x", signing_secret="s")
    worker = Worker(SPEC, settings, broker=broker, kv=kv, storage=storage, manage_connections=False)
    running = asyncio.create_task(worker.run())
    queue = SPEC.queue(settings)
    await broker.declare(queue)
    message = TaskMessage(task_id="task-1", prompt=prompt, duration=0.5, kind=SPEC.kind, model="m")
    await broker.publish(queue, message.to_bytes(), message_id="task-1")
    try:
        for _ in range(1000):
            # Read past the outage: MemoryStore's own get, not the flaky override.
            record = await MemoryStore.get(kv, task_key(SPEC.name, "task-1"))
            if record is not None and b'"succeeded"' in record:
                break
            await asyncio.sleep(0.01)
        return record, await broker.dead_letter_depth(queue), worker
    finally:
        await worker.stop()
        await asyncio.wait_for(running, timeout=10)
        await broker.close()


async def test_a_task_store_outage_delays_but_does_not_fail_the_task(tmp_path: Path) -> None:
    kv = FlakyStore(outage=3)

    record, dead_letters, worker = await run_one_task(tmp_path, kv)

    assert kv.refused == 3
    assert record is not None and b'"succeeded"' in record
    assert b'"attempts":1' in record  # waited in place: no redelivery used up
    assert dead_letters == 0
    assert worker.state == "stopped"


async def test_an_unexpected_error_in_a_batch_requeues_it_and_the_worker_goes_on(
    tmp_path: Path,
) -> None:
    kv = FlakyStore(outage=1, error=RuntimeError("a bug in a dependency"))

    record, dead_letters, _ = await run_one_task(tmp_path, kv)

    assert record is not None and b'"succeeded"' in record
    # Requeued once before its generation started: that used up no attempt.
    assert b'"attempts":1' in record
    assert dead_letters == 0


class SlowUploads(FileStorage):
    """File storage whose uploads of keys holding ``slow`` take ``delay_s``."""

    slow = "never"
    delay_s = 1.0

    async def put(self, key: str, data: bytes, *, content_type: str) -> None:
        if self.slow in key:
            await asyncio.sleep(self.delay_s)
        await super().put(key, data, content_type=content_type)


async def test_a_stop_with_a_backlog_leaves_the_waiting_tasks_in_the_queue(tmp_path: Path) -> None:
    """While the batch in hand finishes, one task's ack frees a prefetch slot: a
    worker still consuming would be handed the next task, bounce it back, be handed
    it again... until the queue's delivery limit dead-letters a task that never ran."""
    settings = load_settings(
        SPEC.settings_class, internal_token="t", worker_batch_size=2, worker_batch_window_ms=300
    )
    broker = MemoryBroker()
    await broker.connect()
    queue = SPEC.queue(settings)
    await broker.declare(queue)
    storage = SlowUploads(tmp_path, public_base_url="http://x", signing_secret="s")
    storage.slow = "task-1/"
    task_ids = [f"task-{i}" for i in range(10)]
    for task_id in task_ids:
        message = TaskMessage(
            task_id=task_id, prompt="rain", duration=0.5, kind=SPEC.kind, model="m"
        )
        await broker.publish(queue, message.to_bytes(), message_id=task_id)
    kv = MemoryStore()
    worker = Worker(SPEC, settings, broker=broker, kv=kv, storage=storage, manage_connections=False)
    running = asyncio.create_task(worker.run())
    for _ in range(500):  # until task-0 is done while task-1 still uploads
        record = await kv.get(task_key(SPEC.name, "task-0"))
        if record is not None and b'"succeeded"' in record:
            break
        await asyncio.sleep(0.01)

    await worker.stop()
    await asyncio.wait_for(running, timeout=10)

    finished = [t for t in task_ids if await kv.get(task_key(SPEC.name, t))]
    assert await broker.dead_letter_depth(queue) == 0
    assert await broker.depth(queue) == len(task_ids) - len(finished)
    await broker.close()


class FailedRecordsDown(MemoryStore):
    """An in-memory store refusing the first ``outage`` writes of a failed record."""

    def __init__(self, outage: int) -> None:
        super().__init__()
        self.outage = outage
        self.refused = 0

    async def set(self, key: str, value: bytes, *, ttl_s: float | None = None) -> None:
        if b'"failed"' in value and self.refused < self.outage:
            self.refused += 1
            raise UnavailableError("Redis unreachable: connection closed by server")
        await super().set(key, value, ttl_s=ttl_s)


class RefusingAdapter(SynthAdapter):
    """The synth backend, refusing one prompt for good."""

    def generate(self, items: Any, progress: Any = None) -> Any:
        if any(item.prompt == "refuse me" for item in items):
            raise PermanentError("the model refuses this prompt")
        return super().generate(items, progress)


async def test_a_failure_is_recorded_through_a_task_store_outage(tmp_path: Path) -> None:
    """A failed task's record is written before it is dead-lettered, outage or not:
    otherwise its record said "running" until the App API's deadline."""
    settings = load_settings(SPEC.settings_class, internal_token="t")
    broker = MemoryBroker()
    await broker.connect()
    queue = SPEC.queue(settings)
    await broker.declare(queue)
    kv = FailedRecordsDown(outage=2)
    storage = FileStorage(tmp_path, public_base_url="http://x", signing_secret="s")
    adapter = RefusingAdapter.from_settings(settings, SPEC)
    worker = Worker(
        SPEC, settings, broker=broker, kv=kv, storage=storage, adapter=adapter,
        manage_connections=False,
    )  # fmt: skip
    running = asyncio.create_task(worker.run())
    message = TaskMessage(
        task_id="task-1", prompt="refuse me", duration=0.5, kind=SPEC.kind, model="m"
    )
    await broker.publish(queue, message.to_bytes(), message_id="task-1")
    try:
        for _ in range(1000):
            record = await kv.get(task_key(SPEC.name, "task-1"))
            if record is not None and b'"failed"' in record:
                break
            await asyncio.sleep(0.01)
        assert record is not None and b"the model refuses this prompt" in record
        assert kv.refused == 2
        assert await broker.dead_letter_depth(queue) == 1
    finally:
        await worker.stop()
        await asyncio.wait_for(running, timeout=10)
        await broker.close()


class SucceededRecordsDown(MemoryStore):
    """An in-memory store refusing every write of a succeeded record."""

    refused = 0

    async def set(self, key: str, value: bytes, *, ttl_s: float | None = None) -> None:
        if b'"succeeded"' in value:
            self.refused += 1
            raise UnavailableError("Redis unreachable: connection closed by server")
        await super().set(key, value, ttl_s=ttl_s)


async def test_a_task_is_acked_only_once_its_result_is_recorded(tmp_path: Path) -> None:
    """The audio is uploaded, but the task store is down: stopped then, the worker
    gives the task back instead of acking it (its result is not safe yet)."""
    settings = load_settings(SPEC.settings_class, internal_token="t")
    broker = MemoryBroker()
    await broker.connect()
    queue = SPEC.queue(settings)
    await broker.declare(queue)
    kv = SucceededRecordsDown()
    storage = FileStorage(tmp_path, public_base_url="http://x", signing_secret="s")
    worker = Worker(SPEC, settings, broker=broker, kv=kv, storage=storage, manage_connections=False)
    running = asyncio.create_task(worker.run())
    message = TaskMessage(task_id="task-1", prompt="rain", duration=0.5, kind=SPEC.kind, model="m")
    await broker.publish(queue, message.to_bytes(), message_id="task-1")
    try:
        for _ in range(1000):
            if kv.refused:
                break
            await asyncio.sleep(0.01)
        assert kv.refused and await storage.exists("audio/task-1/music.wav")
    finally:
        await worker.stop()
        await asyncio.wait_for(running, timeout=10)
    assert await broker.depth(queue) == 1  # back in the queue, not acked
    assert await broker.dead_letter_depth(queue) == 0
    await broker.close()


class UnreadableRecords(MemoryStore):
    """An in-memory store whose reads always fail (a bug): every batch is given back."""

    async def get(self, key: str) -> bytes | None:
        raise RuntimeError("a bug in a dependency")


async def test_a_task_the_queue_would_drop_fails_with_the_reason_instead(tmp_path: Path) -> None:
    """Given back again and again, a task reaches the queue's delivery limit, past
    which the broker dead-letters it without a record or callback: the worker
    fails it itself on its last delivery."""
    settings = load_settings(SPEC.settings_class, internal_token="t")
    broker = MemoryBroker()
    await broker.connect()
    queue = SPEC.queue(settings)
    await broker.declare(queue)
    kv = UnreadableRecords()
    storage = FileStorage(tmp_path, public_base_url="http://x", signing_secret="s")
    worker = Worker(SPEC, settings, broker=broker, kv=kv, storage=storage, manage_connections=False)
    running = asyncio.create_task(worker.run())
    message = TaskMessage(task_id="task-1", prompt="rain", duration=0.5, kind=SPEC.kind, model="m")
    await broker.publish(queue, message.to_bytes(), message_id="task-1")
    try:
        for _ in range(1000):
            if await broker.dead_letter_depth(queue):
                break
            await asyncio.sleep(0.01)
        record = await MemoryStore.get(kv, task_key(SPEC.name, "task-1"))
        assert record is not None and b'"failed"' in record
        assert f"handed to workers {QUEUE_DELIVERY_LIMIT + 1} times".encode() in record
    finally:
        await worker.stop()
        await asyncio.wait_for(running, timeout=10)
        await broker.close()
