"""The worker outlives dependency outages: a task store that is down for a while
delays a task without failing it or using up its attempts, and no error in a
batch ends the worker."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import httpx
import pytest

from core_base.adapters.broker_memory import MemoryBroker
from core_base.adapters.kv_memory import MemoryStore
from core_base.adapters.storage_files import FileStorage
from core_base.backends.synth import SynthAdapter
from core_base.constants import QUEUE_DELIVERY_LIMIT
from core_base.contracts import TaskMessage, TaskResult
from core_base.domain import TaskStatus
from core_base.errors import PermanentError, UnavailableError
from core_base.generation import claims as claims_module
from core_base.generation import task_store as task_store_module
from core_base.generation import worker as worker_module
from core_base.generation.claims import Claims
from core_base.generation.intake import Pending
from core_base.generation.policy import retry_backoff_s
from core_base.generation.process import create_worker_health_app
from core_base.generation.task_store import TaskStore, claim_key, task_key
from core_base.generation.worker import Worker
from core_base.ports.broker import Delivery, QueueSpec
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


@dataclass
class Running:
    """A worker on the in-process broker, consuming; what the tests look at."""

    worker: Worker
    broker: MemoryBroker
    queue: QueueSpec
    kv: MemoryStore
    running: asyncio.Task[None]

    async def stop(self) -> None:
        """SIGTERM's path: stop and drain; the broker stays open to look at."""
        await self.worker.stop()
        await asyncio.wait_for(self.running, timeout=10)

    async def publish(self, task_id: str, prompt: str = "rain") -> None:
        await publish(self.broker, self.queue, task_id, prompt)

    async def record(self, task_id: str) -> bytes | None:
        """A task's record, read past any outage the test's store plays."""
        return await MemoryStore.get(self.kv, task_key(SPEC.name, task_id))

    async def until_record(self, task_id: str, status: str) -> bytes | None:
        for _ in range(1000):
            record = await self.record(task_id)
            if record is not None and f'"{status}"'.encode() in record:
                return record
            await asyncio.sleep(0.01)
        return await self.record(task_id)


async def publish(broker: MemoryBroker, queue: QueueSpec, task_id: str, prompt: str) -> None:
    message = TaskMessage(task_id=task_id, prompt=prompt, duration=0.5, kind=SPEC.kind, model="m")
    await broker.publish(queue, message.to_bytes(), message_id=task_id)


@asynccontextmanager
async def running_worker(
    kv: MemoryStore,
    storage: FileStorage,
    *,
    adapter_class: type[SynthAdapter] = SynthAdapter,
    queued: Sequence[str] = (),
    **settings_overrides: Any,
) -> AsyncIterator[Running]:
    """A worker with ``kv`` and ``storage``; ``queued``: tasks in the queue before it
    starts. Stopped (drained) on leaving."""
    settings = load_settings(SPEC.settings_class, internal_token="t", **settings_overrides)
    broker = MemoryBroker()
    await broker.connect()
    queue = SPEC.queue(settings)
    await broker.declare(queue)
    for task_id in queued:
        await publish(broker, queue, task_id, "rain")
    adapter = adapter_class.from_settings(settings, SPEC)
    worker = Worker(
        SPEC, settings, broker=broker, kv=kv, storage=storage, adapter=adapter,
        manage_connections=False,
    )  # fmt: skip
    run = Running(worker, broker, queue, kv, asyncio.create_task(worker.run()))
    try:
        yield run
    finally:
        await run.stop()
        await broker.close()


def files(tmp_path: Path) -> FileStorage:
    return FileStorage(tmp_path, public_base_url="http://x", signing_secret="s")


async def run_one_task(tmp_path: Path, kv: MemoryStore, prompt: str = "calm sea") -> Any:
    async with running_worker(kv, files(tmp_path)) as run:
        await run.publish("task-1", prompt)
        record = await run.until_record("task-1", "succeeded")
        return record, await run.broker.dead_letter_depth(run.queue), run.worker


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
    storage = SlowUploads(tmp_path, public_base_url="http://x", signing_secret="s")
    storage.slow = "task-1/"
    task_ids = [f"task-{i}" for i in range(10)]
    async with running_worker(
        MemoryStore(), storage, queued=task_ids, worker_batch_size=2, worker_batch_window_ms=300
    ) as run:
        await run.until_record("task-0", "succeeded")  # while task-1 still uploads
        await run.stop()
        finished = [t for t in task_ids if await run.record(t)]
        assert await run.broker.dead_letter_depth(run.queue) == 0
        assert await run.broker.depth(run.queue) == len(task_ids) - len(finished)


async def test_a_worker_is_not_ready_from_its_stop_on_while_it_drains(tmp_path: Path) -> None:
    """Not only once the batch in hand is done: a rollout or a dashboard must see,
    during the drain (minutes, with a model), a worker that takes no more work."""
    storage = SlowUploads(tmp_path, public_base_url="http://x", signing_secret="s")
    storage.slow, storage.delay_s = "task-1/", 2.0
    async with running_worker(MemoryStore(), storage) as run:
        await run.publish("task-1")
        await run.until_record("task-1", "running")
        await run.worker.stop()
        for _ in range(50):  # the worker's loop sees the stop on its next turn
            if run.worker.state == "draining":
                break
            await asyncio.sleep(0.01)
        health = httpx.ASGITransport(app=create_worker_health_app(run.worker))
        async with httpx.AsyncClient(transport=health, base_url="http://worker") as client:
            ready = await client.get("/readyz")
            assert ready.status_code == 503, ready.text
            assert ready.json()["details"]["state"] == "draining"
            assert "worker_ready 0.0" in (await client.get("/metrics")).text
        assert not run.running.done()  # still finishing task-1
        assert await run.until_record("task-1", "succeeded")


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
    kv = FailedRecordsDown(outage=2)
    async with running_worker(kv, files(tmp_path), adapter_class=RefusingAdapter) as run:
        await run.publish("task-1", "refuse me")
        record = await run.until_record("task-1", "failed")
        assert record is not None and b"the model refuses this prompt" in record
        assert kv.refused == 2
        await run.stop()  # the dead letter follows the record
        assert await run.broker.dead_letter_depth(run.queue) == 1


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
    kv = SucceededRecordsDown()
    storage = files(tmp_path)
    async with running_worker(kv, storage) as run:
        await run.publish("task-1")
        for _ in range(1000):
            if kv.refused:
                break
            await asyncio.sleep(0.01)
        assert kv.refused and await storage.exists("audio/task-1/music.wav")
        await run.stop()
        assert await run.broker.depth(run.queue) == 1  # back in the queue, not acked
        assert await run.broker.dead_letter_depth(run.queue) == 0


class UnreadableRecords(MemoryStore):
    """An in-memory store whose reads always fail (a bug): every batch is given back."""

    async def get(self, key: str) -> bytes | None:
        raise RuntimeError("a bug in a dependency")


async def test_a_task_the_queue_would_drop_fails_with_the_reason_instead(tmp_path: Path) -> None:
    """Given back again and again, a task reaches the queue's delivery limit, past
    which the broker dead-letters it without a record or callback: the worker
    fails it itself on its last delivery."""
    async with running_worker(UnreadableRecords(), files(tmp_path)) as run:
        await run.publish("task-1")
        record = await run.until_record("task-1", "failed")
        assert record is not None
        assert f"handed to workers {QUEUE_DELIVERY_LIMIT + 1} times".encode() in record
        await run.stop()  # the dead letter follows the record
        assert await run.broker.dead_letter_depth(run.queue) == 1


class CountingAdapter(SynthAdapter):
    """The synth backend, counting the prompts it generates (warm-up left out)."""

    generated: ClassVar[list[str]] = []

    def generate(self, items: Any, progress: Any = None) -> Any:
        CountingAdapter.generated += [item.prompt for item in items if item.prompt != "warm-up"]
        return super().generate(items, progress)


async def test_a_task_queued_twice_is_generated_once(tmp_path: Path) -> None:
    """Two copies of one task in the queue (a publish repeated by two concurrent
    submits): they reach the same batch, where one runs and the other waits for its
    result, instead of both running."""
    CountingAdapter.generated = []
    async with running_worker(
        MemoryStore(), files(tmp_path), adapter_class=CountingAdapter, queued=["task-1", "task-1"]
    ) as run:
        assert await run.until_record("task-1", "succeeded") is not None
        for _ in range(100):
            if await run.broker.depth(run.queue) == 0:
                break
            await asyncio.sleep(0.01)
        await asyncio.sleep(0.3)  # the second copy's turn
    assert CountingAdapter.generated == ["rain"]


class FailingOnceAdapter(SynthAdapter):
    """The synth backend, failing its first generation (retryable); when each
    generation started, by the event loop's clock."""

    started: ClassVar[list[float]] = []

    def generate(self, items: Any, progress: Any = None) -> Any:
        if any(item.prompt != "warm-up" for item in items):
            FailingOnceAdapter.started.append(time.monotonic())
            if len(FailingOnceAdapter.started) == 1:
                raise RuntimeError("a passing fault")
        return super().generate(items, progress)


async def test_a_second_copy_does_not_skip_the_first_ones_retry_backoff(tmp_path: Path) -> None:
    """Two copies of a task; the first fails (retryable) and waits out its backoff
    here: the second is not run at once as the next attempt (spending attempts
    twice as fast), it is acked, and the first runs again after its backoff."""
    FailingOnceAdapter.started = []
    async with running_worker(
        MemoryStore(), files(tmp_path), adapter_class=FailingOnceAdapter,
        queued=["task-1", "task-1"],
    ) as run:  # fmt: skip
        assert await run.until_record("task-1", "succeeded") is not None
    first, second = FailingOnceAdapter.started
    assert second - first >= 0.9 * retry_backoff_s(1)


async def test_a_redelivery_of_a_copy_lost_during_its_backoff_is_kept(tmp_path: Path) -> None:
    """A copy waits out its retry's backoff when the connection drops: RabbitMQ
    delivers the task again, here. That copy is the one left: it is kept to run,
    not acked as a duplicate (the task would be lost); while the first copy's
    channel lives, a second copy is acked."""
    message = TaskMessage(task_id="task-1", prompt="rain", duration=0.5, kind=SPEC.kind, model="m")
    async with running_worker(MemoryStore(), files(tmp_path)) as run:
        channel_open = [True]
        backing_off = Pending(
            Delivery(b"", "task-1", 1, _withdrawn=lambda: not channel_open[0]), message
        )
        run.worker._backing_off["task-1"] = backing_off

        second = Pending(Delivery(b"", "task-1", 1), message)
        assert await run.worker._one_live_copy_each([second]) == []
        assert second.delivery.settled  # acked: the first one retries

        channel_open[0] = False  # the connection dropped during the backoff
        redelivered = Pending(Delivery(b"", "task-1", 2), message)
        assert await run.worker._one_live_copy_each([redelivered]) == [redelivered]
        assert not redelivered.delivery.settled
        del run.worker._backing_off["task-1"]


class SlowCountingAdapter(SynthAdapter):
    """The synth backend, counting the prompts it generates (warm-up left out),
    each generation taking ``seconds``: long enough to lose a connection in."""

    generated: ClassVar[list[str]] = []
    seconds: ClassVar[float] = 1.0

    def generate(self, items: Any, progress: Any = None) -> Any:
        prompts = [item.prompt for item in items if item.prompt != "warm-up"]
        if prompts:
            SlowCountingAdapter.generated += prompts
            time.sleep(SlowCountingAdapter.seconds)
        return super().generate(items, progress)


async def start_worker(
    broker: MemoryBroker, kv: MemoryStore, storage: FileStorage
) -> tuple[Worker, asyncio.Task[None]]:
    settings = load_settings(SPEC.settings_class, internal_token="t")
    adapter = SlowCountingAdapter.from_settings(settings, SPEC)
    worker = Worker(
        SPEC, settings, broker=broker, kv=kv, storage=storage, adapter=adapter,
        manage_connections=False,
    )  # fmt: skip
    running = asyncio.create_task(worker.run())
    for _ in range(500):
        if worker.ready:
            break
        await asyncio.sleep(0.01)
    return worker, running


async def until(condition: Callable[[], Awaitable[bool]], timeout_s: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if await condition():
            return True
        await asyncio.sleep(0.02)
    return await condition()


async def test_a_copy_redelivered_to_another_worker_waits_for_the_one_generating_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A worker's connection drops while it generates a task, and RabbitMQ delivers
    the task again, to another worker: that one waits for the first one's result
    instead of generating the task too, in parallel (twice the GPU time, and the
    audio object overwritten with other audio after the client was told of it).
    Once the result is there, the copy is acked."""
    monkeypatch.setattr(worker_module, "TASK_CLAIM_CHECK_S", 0.05)
    SlowCountingAdapter.generated, SlowCountingAdapter.seconds = [], 1.0
    kv, storage = MemoryStore(), files(tmp_path)
    first_connection = MemoryBroker()
    await first_connection.connect()
    queue = SPEC.queue(load_settings(SPEC.settings_class, internal_token="t"))
    await first_connection.declare(queue)
    second_connection = first_connection.peer()
    await second_connection.connect()
    first, first_running = await start_worker(first_connection, kv, storage)
    await publish(first_connection, queue, "task-1", "rain")

    async def generating() -> bool:
        return SlowCountingAdapter.generated == ["rain"]

    assert await until(generating)
    second, second_running = await start_worker(second_connection, kv, storage)
    await first_connection.close()  # its unacked delivery goes to the second worker

    async def settled_everywhere() -> bool:
        raw = await kv.get(task_key(SPEC.name, "task-1"))
        done = raw is not None and b'"succeeded"' in raw
        return done and not second_connection._unsettled

    try:
        assert await until(settled_everywhere)
        assert await second_connection.depth(queue) == 0
        assert SlowCountingAdapter.generated == ["rain"]
    finally:
        for worker, running in ((first, first_running), (second, second_running)):
            await worker.stop()
            await asyncio.wait_for(running, timeout=10)
        await second_connection.close()


async def test_a_copy_waiting_for_another_worker_runs_once_that_one_is_gone(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The worker generating a task died (its claim on the task runs out without a
    result): the copy that waited for it runs, as the task's next attempt."""
    monkeypatch.setattr(worker_module, "TASK_CLAIM_CHECK_S", 0.05)
    SlowCountingAdapter.generated, SlowCountingAdapter.seconds = [], 0.0
    kv = MemoryStore()
    running = TaskResult(task_id="task-1", kind=SPEC.kind, status=TaskStatus.RUNNING, attempts=1)
    await kv.set(task_key(SPEC.name, "task-1"), running.to_bytes())
    await kv.set(claim_key(SPEC.name, "task-1"), b"host:1:lost", ttl_s=0.5)
    async with running_worker(
        kv, files(tmp_path), adapter_class=SlowCountingAdapter, queued=["task-1"]
    ) as run:
        await asyncio.sleep(0.3)
        assert SlowCountingAdapter.generated == []  # the other worker still holds it
        record = await run.until_record("task-1", "succeeded")
        assert record is not None
        assert TaskResult.from_bytes(record).attempts == 2
        assert SlowCountingAdapter.generated == ["rain"]


class StallingOnce(MemoryStore):
    """Its first claim renewal times out (a Redis stall): raises after a while."""

    stalls = 1

    async def hold_many(self, leases: Any, *, ttl_s: float, read: Any = (), **more: Any) -> Any:
        if not read and StallingOnce.stalls:  # a renewal (a check reads the records)
            StallingOnce.stalls -= 1
            await asyncio.sleep(0.3)
            raise UnavailableError("Redis unreachable: Timeout reading from socket")
        return await super().hold_many(leases, ttl_s=ttl_s, read=read, **more)


@pytest.mark.parametrize("renewal_stalls", [False, True], ids=["renewed", "after a stall"])
async def test_every_task_of_a_group_stays_claimed_until_it_is_done(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, renewal_stalls: bool
) -> None:
    """A group's claims are renewed until the whole group is done: a retry waiting
    for the first tries' batch (it runs alone, after them) keeps its claim however
    long that batch takes, and a renewal that timed out is tried again soon enough
    for no claim to run out (nor is one that did lost for good)."""
    monkeypatch.setattr(task_store_module, "TASK_CLAIM_TTL_S", 0.6)
    monkeypatch.setattr(claims_module, "TASK_CLAIM_RENEW_S", 0.2)
    monkeypatch.setattr(claims_module, "_RETRY_S", 0.05)
    SlowCountingAdapter.generated, SlowCountingAdapter.seconds = [], 1.5
    StallingOnce.stalls = 1 if renewal_stalls else 0
    kv = StallingOnce()
    started_before = TaskResult(task_id="b", kind=SPEC.kind, status=TaskStatus.RUNNING, attempts=1)
    await kv.set(task_key(SPEC.name, "b"), started_before.to_bytes())
    async with running_worker(
        kv, files(tmp_path), adapter_class=SlowCountingAdapter, queued=["a", "b"]
    ) as run:

        async def generating() -> bool:
            return SlowCountingAdapter.generated == ["rain"]

        assert await until(generating)  # the first tries' batch: "a"
        claims = []
        for _ in range(12):  # past the claims' TTL, twice
            claims.append(await kv.get(claim_key(SPEC.name, "b")) is not None)
            await asyncio.sleep(0.1)
        assert all(claims), claims
        assert await run.until_record("b", "succeeded") is not None


async def test_a_task_another_worker_generates_is_not_failed_for_its_copies_deliveries(
    tmp_path: Path,
) -> None:
    """Copies of a task that another worker, alive, generates go round while they
    wait (stops and lost connections here). Past the delivery limit, neither the
    hand-back nor the dead-letter watch fails the task under the worker generating
    it: a fresh copy is queued instead (that worker renews its claim: no crash loop)."""
    kv = MemoryStore()
    running = TaskResult(task_id="t", kind=SPEC.kind, status=TaskStatus.RUNNING, attempts=1)
    await kv.set(task_key(SPEC.name, "t"), running.to_bytes())
    await kv.set(claim_key(SPEC.name, "t"), b"pod-a:1:aa#1", ttl_s=60)
    message = TaskMessage(task_id="t", prompt="rain", duration=0.5, kind=SPEC.kind, model="m")
    async with running_worker(kv, files(tmp_path)) as run:
        await run.stop()  # consuming no more: the fresh copies stay in the queue
        settled: list[str] = []

        async def note(what: str) -> None:
            settled.append(what)

        worn = Pending(
            Delivery(
                message.to_bytes(), "t", QUEUE_DELIVERY_LIMIT + 1,
                _ack=lambda: note("ack"), _dead_letter=lambda: note("dead_letter"),
            ),
            message,
        )  # fmt: skip
        await run.worker._give_back(worn)
        dead_letter = Delivery(
            message.to_bytes(), "t", 1,
            headers={"x-first-death-reason": "delivery_limit"}, _ack=lambda: note("ack"),
        )  # fmt: skip
        await run.worker._fail_dead_lettered(dead_letter)
        assert settled == ["ack", "ack"]
        assert await run.broker.depth(run.queue) == 2  # the fresh copies
        record = await run.record("t")
        assert record is not None and TaskResult.from_bytes(record).status == TaskStatus.RUNNING


class ClaimReads(MemoryStore):
    """Reads of a claim run ``on_read`` first (a stop arriving, or a fault)."""

    def __init__(self, on_read: Callable[[], Awaitable[None]]) -> None:
        super().__init__()
        self.on_read = on_read

    async def get_many(self, keys: Sequence[str]) -> list[bytes | None]:
        if any(key.endswith(":worker") for key in keys):
            await self.on_read()
        return await super().get_many(keys)


@pytest.mark.parametrize("during_the_read", ["a stop", "a fault"])
async def test_a_copy_waiting_for_another_worker_is_handed_back_on_a_stop_or_a_fault(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, during_the_read: str
) -> None:
    """A stop that comes while the waiting copy looks at the task (the other worker
    just let go of it) hands the copy back instead of putting it in the inbox,
    emptied by then; so does a fault in the waiting itself: never left unsettled."""
    monkeypatch.setattr(worker_module, "TASK_CLAIM_CHECK_S", 0.01)
    worker_holder: list[Worker] = []

    async def on_read() -> None:
        if during_the_read == "a stop":
            await worker_holder[0].stop()
        else:
            raise RuntimeError("a bug")

    kv = ClaimReads(on_read)
    message = TaskMessage(task_id="t", prompt="rain", duration=0.5, kind=SPEC.kind, model="m")
    async with running_worker(kv, files(tmp_path)) as run:
        worker_holder.append(run.worker)
        settled: list[str] = []

        async def note(what: str) -> None:
            settled.append(what)

        copy = Pending(
            Delivery(message.to_bytes(), "t", 1, _requeue=lambda: note("requeue")), message
        )
        await asyncio.wait_for(run.worker._wait_for_holder(copy, b"pod-a:1:aa#1"), timeout=5)
        assert settled == ["requeue"]
        assert run.worker._inbox.take_all() == []


class ProgressingAdapter(SlowCountingAdapter):
    """Takes as long, reporting a step every 0.1 s meanwhile."""

    def generate(self, items: Any, progress: Any = None) -> Any:
        if progress is not None and any(item.prompt != "warm-up" for item in items):
            for step in range(int(SlowCountingAdapter.seconds / 0.1)):
                time.sleep(0.1)
                progress(step, 1000)
            return SynthAdapter.generate(self, items, None)
        return super().generate(items, progress)


@pytest.mark.parametrize("adapter_class", [SlowCountingAdapter, ProgressingAdapter])
async def test_a_model_that_shows_no_progress_keeps_no_claim(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, adapter_class: type[SynthAdapter]
) -> None:
    """A model silent for TASK_CLAIM_STALL_S (a hung GPU call) stops renewing its
    tasks' claims, for the copies waiting elsewhere to run them; one that reports
    its steps keeps them however long it takes."""
    monkeypatch.setattr(task_store_module, "TASK_CLAIM_TTL_S", 0.4)
    monkeypatch.setattr(claims_module, "TASK_CLAIM_RENEW_S", 0.1)
    monkeypatch.setattr(claims_module, "TASK_CLAIM_STALL_S", 0.3)
    SlowCountingAdapter.generated, SlowCountingAdapter.seconds = [], 1.5
    kv = MemoryStore()
    async with running_worker(kv, files(tmp_path), adapter_class=adapter_class) as run:
        await run.publish("t")
        for _ in range(500):
            if await kv.get(claim_key(SPEC.name, "t")) is not None:
                break
            await asyncio.sleep(0.01)
        claimed = []
        for _ in range(10):
            claimed.append(await kv.get(claim_key(SPEC.name, "t")) is not None)
            await asyncio.sleep(0.1)
        assert all(claimed) is (adapter_class is ProgressingAdapter), claimed
        assert await run.until_record("t", "succeeded") is not None


def worn_copy(settled: list[str], *, withdrawn: bool = False) -> Pending:
    """A copy of task "t" past the queue's delivery limit; its settlement noted."""
    message = TaskMessage(task_id="t", prompt="rain", duration=0.5, kind=SPEC.kind, model="m")

    async def note(what: str) -> None:
        settled.append(what)

    delivery = Delivery(
        message.to_bytes(), "t", QUEUE_DELIVERY_LIMIT + 1,
        _ack=lambda: note("ack"), _requeue=lambda: note("requeue"),
        _dead_letter=lambda: note("dead_letter"), _withdrawn=lambda: withdrawn,
    )  # fmt: skip
    return Pending(delivery, message)


async def test_a_worn_copy_of_a_finished_task_repeats_its_result(tmp_path: Path) -> None:
    """Past the delivery limit, a copy of a task whose result is recorded (its
    claim long gone) is acked with the result, not failed over it."""
    kv = MemoryStore()
    done = TaskResult(task_id="t", kind=SPEC.kind, status=TaskStatus.SUCCEEDED, progress=1.0)
    await kv.set(task_key(SPEC.name, "t"), done.to_bytes())
    async with running_worker(kv, files(tmp_path)) as run:
        await run.stop()
        settled: list[str] = []
        await run.worker._give_back(worn_copy(settled))
        assert settled == ["ack"]
        record = await run.record("t")
        assert record is not None and TaskResult.from_bytes(record).status == TaskStatus.SUCCEEDED


class RefusingPublishes(MemoryBroker):
    async def publish(self, queue: QueueSpec, body: bytes, *, message_id: str) -> None:
        raise UnavailableError("RabbitMQ: connection lost")


async def test_a_worn_copy_of_a_task_being_generated_is_never_failed(tmp_path: Path) -> None:
    """Past the delivery limit, a copy of a task a worker generates now is not
    failed: dropped when its channel is gone (the broker has it back), requeued
    when no fresh copy can be queued (the dead-letter watch takes it from there)."""
    kv = MemoryStore()
    running = TaskResult(task_id="t", kind=SPEC.kind, status=TaskStatus.RUNNING, attempts=1)
    await kv.set(task_key(SPEC.name, "t"), running.to_bytes())
    await kv.set(claim_key(SPEC.name, "t"), b"pod-a:1:aa#1", ttl_s=60)
    async with running_worker(kv, files(tmp_path)) as run:
        await run.stop()
        settled: list[str] = []
        await run.worker._give_back(worn_copy(settled, withdrawn=True))
        assert settled == []
        run.worker._broker = RefusingPublishes()
        await run.worker._give_back(worn_copy(settled))
        assert settled == ["requeue"]
        record = await run.record("t")
        assert record is not None and TaskResult.from_bytes(record).status == TaskStatus.RUNNING


async def test_the_dead_letter_watch_never_fails_a_task_its_own_worker_generates(
    tmp_path: Path,
) -> None:
    """The dead-letter watch is shared by every worker: the dead letter of a task may
    come to the very worker generating it, which must not fail it under itself."""
    SlowCountingAdapter.generated, SlowCountingAdapter.seconds = [], 1.0
    kv = MemoryStore()
    message = TaskMessage(task_id="t", prompt="rain", duration=0.5, kind=SPEC.kind, model="m")
    async with running_worker(kv, files(tmp_path), adapter_class=SlowCountingAdapter) as run:
        await run.publish("t")

        async def generating() -> bool:
            return SlowCountingAdapter.generated == ["rain"]

        assert await until(generating)
        acked: list[str] = []

        async def ack() -> None:
            acked.append("ack")

        dead_letter = Delivery(
            message.to_bytes(), "t", 1,
            headers={"x-first-death-reason": "delivery_limit"}, _ack=ack,
        )  # fmt: skip
        await run.worker._fail_dead_lettered(dead_letter)
        assert acked == ["ack"]
        record = await run.record("t")
        assert record is not None and TaskResult.from_bytes(record).status == TaskStatus.RUNNING
        assert await run.until_record("t", "succeeded") is not None


async def test_a_stale_claim_of_this_worker_is_taken_over_at_once(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A claim this worker no longer holds (its release failed) does not make the
    task wait for this worker: the next check takes it over."""
    monkeypatch.setattr(worker_module, "TASK_CLAIM_CHECK_S", 0.05)
    SlowCountingAdapter.generated, SlowCountingAdapter.seconds = [], 0.0
    kv = MemoryStore()
    async with running_worker(kv, files(tmp_path), adapter_class=SlowCountingAdapter) as run:
        stale = run.worker._claims.new_claimant()
        await kv.set(claim_key(SPEC.name, "t"), stale, ttl_s=60)
        await run.publish("t")
        for _ in range(100):
            if SlowCountingAdapter.generated:
                break
            await asyncio.sleep(0.01)
        assert SlowCountingAdapter.generated == ["rain"]


class SlowRenewals(MemoryStore):
    """Renewals take a while (a check, which reads the records, does not)."""

    async def hold_many(self, leases: Any, *, ttl_s: float, read: Any = (), **more: Any) -> Any:
        if not read:
            await asyncio.sleep(0.2)
        return await super().hold_many(leases, ttl_s=ttl_s, read=read, **more)


async def test_a_release_waits_for_a_renewal_under_way(monkeypatch: pytest.MonkeyPatch) -> None:
    """A renewal under way when a claim is released would take the claim again just
    after (a claim nobody renews nor releases, that copies wait out)."""
    monkeypatch.setattr(claims_module, "TASK_CLAIM_RENEW_S", 0.05)
    kv = SlowRenewals()
    claims = Claims(TaskStore(kv, SPEC.name, 3600))
    claimant = claims.new_claimant()
    await claims.check_and_claim(["t"], claimant)
    keeping = asyncio.create_task(claims.keep())
    try:
        await asyncio.sleep(0.1)  # a renewal of "t" under way
        await claims.let_go(["t"], claimant, release=True)
        await asyncio.sleep(0.3)
        assert await kv.get(claim_key(SPEC.name, "t")) is None
    finally:
        keeping.cancel()


class RunningMarksFailOnce(MemoryStore):
    """The first running marks fail with an error that is no outage."""

    failed = False

    async def set_many_unless_containing(self, items: Any, **more: Any) -> list[bool]:
        if not RunningMarksFailOnce.failed:
            RunningMarksFailOnce.failed = True
            raise RuntimeError("MISCONF Redis is configured to save RDB snapshots")
        return await super().set_many_unless_containing(items, **more)


async def test_a_failing_group_does_not_hand_back_a_copy_it_handed_to_wait(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A group fails unexpectedly after one of its copies, handed to wait for another
    worker, went back to the inbox (that worker let go): the group's fallback hands
    back its own tasks only, not that copy, which runs from the inbox."""
    monkeypatch.setattr(worker_module, "TASK_CLAIM_CHECK_S", 0.05)
    SlowCountingAdapter.generated, SlowCountingAdapter.seconds = [], 1.0
    RunningMarksFailOnce.failed = False
    kv = RunningMarksFailOnce()
    await kv.set(claim_key(SPEC.name, "b"), b"pod-a:1:aa#1", ttl_s=0.3)
    handed_back: list[str] = []
    async with running_worker(
        kv, files(tmp_path), adapter_class=SlowCountingAdapter, queued=["a", "b"]
    ) as run:
        give_back = run.worker._give_back

        async def noting(pending: Pending) -> None:
            handed_back.append(pending.message.task_id)
            await give_back(pending)

        run.worker._give_back = noting  # type: ignore[method-assign]
        assert await run.until_record("a", "succeeded") is not None
        assert await run.until_record("b", "succeeded") is not None
    assert "b" not in handed_back, handed_back
    assert sorted(SlowCountingAdapter.generated) == ["rain", "rain", "rain"]  # a twice, b once


class GatedRenewals(TaskStore):
    """Renewals reach the store once ``gate`` opens (Redis a little slow)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.gate = asyncio.Event()
        self.under_way = asyncio.Event()

    async def renew_claims(self, claims: Any, **more: Any) -> dict[str, bytes]:
        self.under_way.set()
        await self.gate.wait()
        return await super().renew_claims(claims, **more)


async def test_a_renewal_under_way_never_takes_a_next_groups_claim_back() -> None:
    """A group ends with a task unfinished while a renewal of its claims is under
    way, and the next group (another copy of the task) claims it: the renewal must
    not take the claim back for the group that ended, whose release would then
    delete the claim the next group generates under."""
    kv = MemoryStore()
    store = GatedRenewals(kv, SPEC.name, 3600)
    claims = Claims(store)
    ended = claims.new_claimant()
    await claims.check_and_claim(["t"], ended)
    renewal = asyncio.create_task(claims._renew())
    await store.under_way.wait()
    release = asyncio.create_task(claims.let_go(["t"], ended, release=True))
    await asyncio.sleep(0)
    running = claims.new_claimant()
    assert [holder for _, holder in await claims.check_and_claim(["t"], running)] == [None]
    store.gate.set()
    await renewal
    await release
    assert await kv.get(claim_key(SPEC.name, "t")) == running
    assert claims.alive(running)


async def test_a_copy_given_back_twice_is_handed_on_once(tmp_path: Path) -> None:
    """A failing group gives back a copy that its retry's backoff gives back again:
    the second time changes nothing (no second fresh copy past the delivery limit)."""
    kv = MemoryStore()
    await kv.set(claim_key(SPEC.name, "t"), b"pod-a:1:aa#1", ttl_s=60)
    async with running_worker(kv, files(tmp_path)) as run:
        await run.stop()
        settled: list[str] = []
        copy = worn_copy(settled)
        await run.worker._give_back(copy)
        await run.worker._give_back(copy)
        assert settled == ["ack"]
        assert await run.broker.depth(run.queue) == 1


class CanceledRightAfterTheCheck(MemoryStore):
    """A cancel (the sub-service API's) lands just after the worker's check."""

    async def hold_many(self, leases: Any, *, ttl_s: float, read: Any = (), **more: Any) -> Any:
        checked = await super().hold_many(leases, ttl_s=ttl_s, read=read, **more)
        if read:
            canceled = TaskResult(
                task_id="t", kind=SPEC.kind, status=TaskStatus.CANCELED, error="canceled"
            )
            await self.set(task_key(SPEC.name, "t"), canceled.to_bytes())
        return checked


async def test_a_cancel_after_the_check_is_never_undone_by_the_worker(tmp_path: Path) -> None:
    """A cancel recorded between the worker's check and its running mark, or during
    the generation, stays: neither the running mark nor the result overwrites it
    (the task's generation is wasted, its record says canceled, as the App API does)."""
    kv = CanceledRightAfterTheCheck()
    async with running_worker(kv, files(tmp_path), queued=["t"]) as run:
        audio = tmp_path / "audio" / "t"
        for _ in range(500):  # generated and uploaded
            if audio.exists() and any(audio.iterdir()):
                break
            await asyncio.sleep(0.01)
        assert audio.exists()
        await asyncio.sleep(0.3)  # its record written (or not), acked
        record = await run.record("t")
        assert record is not None
        assert TaskResult.from_bytes(record).status == TaskStatus.CANCELED
        assert await run.broker.dead_letter_depth(run.queue) == 0
        # Counted as what it was: generated, not the task's result.
        registry = run.worker.metrics.registry
        for outcome, count in (("superseded", 1.0), ("succeeded", 0.0)):
            labels = {"service": SPEC.name, "outcome": outcome}
            assert registry.get_sample_value("generation_tasks_total", labels) == count
