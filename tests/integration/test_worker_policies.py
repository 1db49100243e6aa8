"""Worker policies on the real RabbitMQ, Redis and S3, with the worker in-process
so the test can count ``generate`` calls and make tasks fail on purpose:
batching, a failing task failing alone, poison tasks dead-lettered with a
``failed`` callback, unreadable messages dead-lettered."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import re
import threading
import uuid
from collections.abc import AsyncIterator, Hashable, Sequence
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

import boto3
import pytest
from aiohttp import web
from prometheus_client import generate_latest

from audio_gen.service import SPEC
from core_base.adapters.broker_amqp import AmqpBroker
from core_base.adapters.factory import create_broker, create_kv, create_storage
from core_base.adapters.storage_s3 import S3Storage
from core_base.audio.encoding import decode
from core_base.constants import MAX_TASK_ATTEMPTS, QUEUE_DELIVERY_LIMIT
from core_base.contracts import TaskMessage, TaskResult
from core_base.domain import AudioFormat, Kind, TaskStatus
from core_base.errors import PermanentError
from core_base.generation import worker as worker_module
from core_base.generation.models import GeneratedAudio, GenerationItem, ProgressCallback
from core_base.generation.task_store import TaskStore
from core_base.generation.worker import Worker
from core_base.ports.broker import Broker, QueueSpec
from core_base.ports.storage import ObjectStorage
from core_base.settings import GenerationSettings, load_settings
from tests.support.infra import RealInfra, free_port
from tests.support.probes import ping_refusal
from tests.support.receiver import Receiver, run_receiver
from tests.support.tcp_proxy import TcpProxy

pytestmark = pytest.mark.integration


class ScriptedAdapter:
    """The real synth backend, wrapped to count calls and to fail on purpose:
    prompts containing "poison" raise (retryable), "invalid" raise PermanentError."""

    def __init__(self, inner: Any) -> None:
        self.inner = inner
        self.backend, self.model_id = inner.backend, inner.model_id
        self.batch_invariant = inner.batch_invariant
        self.sample_rate, self.channels = inner.sample_rate, inner.channels
        self.batches: list[list[str]] = []
        self.gate = threading.Event()
        self.gate.set()

    def load(self, progress: Any = None) -> None:
        self.inner.load(progress)

    def generate(
        self, batch: Sequence[GenerationItem], progress: ProgressCallback | None = None
    ) -> list[GeneratedAudio]:
        self.gate.wait(timeout=30)
        self.batches.append([item.prompt for item in batch])
        for item in batch:
            if "poison" in item.prompt:
                raise RuntimeError("the model chokes on this prompt")
            if "invalid" in item.prompt:
                raise PermanentError("this prompt can never work")
        result: list[GeneratedAudio] = self.inner.generate(batch, progress)
        return result

    def describe(self) -> dict[str, Any]:
        description: dict[str, Any] = self.inner.describe()
        return description

    def prompt_batch_key(self, prompt: str) -> Hashable:
        key: Hashable = self.inner.prompt_batch_key(prompt)
        return key


@pytest.fixture
def settings(real_infra: RealInfra) -> GenerationSettings:
    return load_settings(
        SPEC.settings_class,
        **{k.lower(): v for k, v in real_infra.env().items()},
        internal_token="t",
        worker_batch_size=4,
        worker_batch_window_ms=200,
    )


@pytest.fixture
async def broker(settings: GenerationSettings) -> AsyncIterator[Broker]:
    broker = create_broker(settings)
    await broker.connect()
    yield broker
    await broker.close()


@pytest.fixture
def receiver() -> Any:
    with run_receiver() as receiver:
        yield receiver


@pytest.fixture
async def worker_factory(settings: GenerationSettings, broker: Broker) -> AsyncIterator[Any]:
    running: list[tuple[Worker, asyncio.Task[None]]] = []
    storage = create_storage(settings)
    await storage.ensure_bucket()
    kv = create_kv(settings)

    async def start(adapter: ScriptedAdapter, *, store: ObjectStorage | None = None) -> Worker:
        """A ready worker; ``store``: its object storage instead of the test's S3."""
        worker = Worker(
            SPEC,
            settings,
            broker=broker,
            kv=kv,
            storage=store or storage,
            adapter=adapter,
            manage_connections=False,
        )
        task = asyncio.create_task(worker.run())
        running.append((worker, task))
        for _ in range(500):
            if worker.ready:
                return worker
            await asyncio.sleep(0.01)
        raise AssertionError("worker never became ready")

    yield start
    for worker, task in running:
        await worker.stop()
        await asyncio.wait_for(task, timeout=30)
    await kv.close()
    await storage.close()


def synth(settings: GenerationSettings) -> ScriptedAdapter:
    from core_base.backends.synth import SynthAdapter

    return ScriptedAdapter(SynthAdapter.from_settings(settings, SPEC))


async def publish(
    broker: Broker,
    settings: GenerationSettings,
    receiver: Receiver,
    prompt: str,
    duration: float = 1.0,
    format: AudioFormat = AudioFormat.WAV,
) -> str:
    task_id = str(uuid.uuid4())
    message = TaskMessage(
        task_id=task_id,
        prompt=prompt,
        duration=duration,
        kind=Kind.SOUND,
        model="m",
        format=format,
        callback_url=f"{receiver.url}/cb",
    )
    queue = SPEC.queue(settings)
    await broker.declare(queue)
    await broker.publish(queue, message.to_bytes(), message_id=task_id)
    return task_id


def generated_prompts(adapter: ScriptedAdapter) -> list[str]:
    """Every prompt the model was called with, after the worker's warm-up."""
    return [prompt for batch in adapter.batches for prompt in batch if prompt != "warm-up"]


async def terminal(receiver: Receiver, task_id: str, timeout_s: float = 30) -> dict[str, Any]:
    def done(_: object) -> bool:
        return any(
            r.json()["task_id"] == task_id and r.json()["status"] in ("succeeded", "failed")
            for r in receiver.snapshot()
        )

    await asyncio.to_thread(receiver.wait_for, done, timeout_s)
    return next(
        r.json()
        for r in receiver.snapshot()
        if r.json()["task_id"] == task_id and r.json()["status"] in ("succeeded", "failed")
    )


async def put_record(settings: GenerationSettings, result: TaskResult) -> None:
    """Write a task's record as a worker (or its crash) would have left it."""
    kv = create_kv(settings)
    try:
        await TaskStore(kv, SPEC.name, 60).put(result)
    finally:
        await kv.close()


async def read_record(settings: GenerationSettings, task_id: str) -> TaskResult | None:
    kv = create_kv(settings)
    try:
        return await TaskStore(kv, SPEC.name, 60).get(task_id)
    finally:
        await kv.close()


async def test_compatible_tasks_share_one_generate_call(
    settings: GenerationSettings, broker: Broker, receiver: Receiver, worker_factory: Any
) -> None:
    adapter = synth(settings)
    ids = [await publish(broker, settings, receiver, f"bird song {i}") for i in range(4)]
    worker = await worker_factory(adapter)

    results = [await terminal(receiver, task_id) for task_id in ids]
    metrics = generate_latest(worker.metrics.registry).decode()
    assert 'generation_batch_size_sum{service="audio_gen"} 4.0' in metrics
    # One generate call: one observation of its time, not one per task.
    assert 'generation_batch_seconds_count{service="audio_gen"} 1.0' in metrics
    # Buckets for minutes-long model calls, not only the default's 10 s.
    assert 'generation_batch_seconds_bucket{le="300.0",service="audio_gen"} 1.0' in metrics

    assert all(r["status"] == "succeeded" for r in results)
    generate_calls = adapter.batches[1:]  # the first call is the warm-up
    assert len(generate_calls) == 1, generate_calls
    assert sorted(generate_calls[0]) == sorted(f"bird song {i}" for i in range(4))
    assert {r["output"]["generation"]["batch_size"] for r in results} == {4}


async def test_incompatible_tasks_are_split_into_separate_calls(
    settings: GenerationSettings, broker: Broker, receiver: Receiver, worker_factory: Any
) -> None:
    adapter = synth(settings)
    short = await publish(broker, settings, receiver, "short", duration=1.0)
    long = await publish(broker, settings, receiver, "long", duration=20.0)
    await worker_factory(adapter)

    assert (await terminal(receiver, short))["status"] == "succeeded"
    assert (await terminal(receiver, long))["status"] == "succeeded"
    assert sorted(map(tuple, adapter.batches[1:])) == [("long",), ("short",)]


async def dead_letters(broker: Broker, queue: QueueSpec, expected: int = 1) -> int:
    """The dead-letter queue's depth once it reaches ``expected`` (or after 5 s): a
    rejected message reaches it a moment after the reject is sent, and the failure
    callback can arrive before that."""
    for _ in range(100):
        depth = await broker.dead_letter_depth(queue)
        if depth == expected:
            break
        await asyncio.sleep(0.05)
    return depth


async def test_a_failing_task_fails_alone_and_ends_dead_lettered(
    settings: GenerationSettings, broker: Broker, receiver: Receiver, worker_factory: Any
) -> None:
    adapter = synth(settings)
    good = await publish(broker, settings, receiver, "calm sea")
    bad = await publish(broker, settings, receiver, "poison pill")
    await worker_factory(adapter)

    assert (await terminal(receiver, good))["status"] == "succeeded"
    failed = await terminal(receiver, bad)

    assert failed["status"] == "failed"
    assert "chokes" in failed["error"]
    assert failed["attempts"] == MAX_TASK_ATTEMPTS
    queue = SPEC.queue(settings)
    assert await dead_letters(broker, queue) == 1
    assert await broker.depth(queue) == 0
    # One callback saying failed, not one per attempt.
    finals = [
        r
        for r in receiver.snapshot()
        if r.json()["task_id"] == bad and r.json()["status"] == "failed"
    ]
    assert len(finals) == 1
    record = await read_record(settings, bad)
    assert record is not None and record.status == "failed"


async def test_a_task_that_started_before_runs_alone(
    settings: GenerationSettings,
    broker: Broker,
    receiver: Receiver,
    worker_factory: Any,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A task whose generation started and never finished may be what brought a
    worker down (out of memory, a crash in the model): its batch-mates go without it,
    and the log says so (an operator sees the restart picked it up)."""
    caplog.set_level(logging.INFO, logger="core_base.generation.worker")
    adapter = synth(settings)
    ids = [await publish(broker, settings, receiver, f"bird song {i}") for i in range(3)]
    crashed = TaskResult(task_id=ids[0], kind=Kind.SOUND, status=TaskStatus.RUNNING, attempts=1)
    await put_record(settings, crashed)
    await worker_factory(adapter)

    results = [await terminal(receiver, task_id) for task_id in ids]

    assert [r["status"] for r in results] == ["succeeded"] * 3
    assert [r["attempts"] for r in results] == [2, 1, 1]
    calls = sorted(sorted(call) for call in adapter.batches[1:])
    assert calls == [["bird song 0"], ["bird song 1", "bird song 2"]]
    assert (
        f"task {ids[0]}: attempt 2 of 3 (an earlier start failed or did not finish)" in caplog.text
    )


async def test_a_task_whose_every_start_was_lost_fails_saying_so(
    settings: GenerationSettings,
    broker: Broker,
    receiver: Receiver,
    worker_factory: Any,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Its last start ended without a result (the worker killed mid-task each
    time): failed without a run, with a reason for the client and an ERROR line for
    the on-call engineer (there was none)."""
    task_id = await publish(broker, settings, receiver, "the last straw")
    lost = TaskResult(
        task_id=task_id, kind=Kind.SOUND, status=TaskStatus.RUNNING, attempts=MAX_TASK_ATTEMPTS
    )
    await put_record(settings, lost)
    adapter = synth(settings)
    with caplog.at_level(logging.ERROR, logger="core_base.generation.worker"):
        await worker_factory(adapter)
        failed = await terminal(receiver, task_id)
    assert failed["status"] == "failed"
    assert "the worker was lost mid-task" in failed["error"]
    assert f"task {task_id} failed: gave up after {MAX_TASK_ATTEMPTS} attempts" in caplog.text
    assert adapter.batches[1:] == []  # not run a fourth time (the first is the warm-up)


async def test_a_task_given_back_before_it_started_uses_up_no_attempt(
    settings: GenerationSettings, broker: Broker, receiver: Receiver, worker_factory: Any
) -> None:
    """Stops and lost connections hand prefetched tasks back (each a delivery):
    attempts count starts of the generation, so those cost the task nothing."""
    task_id = await publish(broker, settings, receiver, "calm sea")
    queue = SPEC.queue(settings)
    handed_back = 0

    async def give_back(delivery: Any) -> None:
        nonlocal handed_back
        handed_back += 1
        if handed_back == MAX_TASK_ATTEMPTS:
            await broker.cancel_consumers()  # this one goes to the worker
        await delivery.requeue()

    await broker.consume(queue, give_back, prefetch=1)
    for _ in range(500):
        if handed_back == MAX_TASK_ATTEMPTS:
            break
        await asyncio.sleep(0.01)
    await worker_factory(synth(settings))

    done = await terminal(receiver, task_id)
    assert handed_back == MAX_TASK_ATTEMPTS
    assert (done["status"], done["attempts"]) == ("succeeded", 1)


async def test_a_finished_task_delivered_again_is_not_generated_again(
    settings: GenerationSettings, broker: Broker, receiver: Receiver, worker_factory: Any
) -> None:
    """At-least-once delivery, exactly-once effect: the same message published again
    after its task succeeded (a redelivery after a lost ack) is acked with its
    callback repeated, and the model is not called again; a new task in the same
    batch is generated as usual."""
    adapter = synth(settings)
    task_id = await publish(broker, settings, receiver, "calm sea")
    worker = await worker_factory(adapter)
    first = await terminal(receiver, task_id)
    assert first["status"] == "succeeded"
    assert generated_prompts(adapter) == ["calm sea"]

    adapter.gate.clear()  # hold the model: the repeat may share a batch with the new task
    queue = SPEC.queue(settings)
    message = TaskMessage(
        task_id=task_id,
        prompt="calm sea",
        duration=1.0,
        kind=Kind.SOUND,
        model="m",
        callback_url=f"{receiver.url}/cb",
    )
    await broker.publish(queue, message.to_bytes(), message_id=task_id)
    fresh = await publish(broker, settings, receiver, "open field")
    adapter.gate.set()
    assert (await terminal(receiver, fresh))["status"] == "succeeded"

    def repeated(_: object) -> bool:
        return (
            sum(
                1
                for r in receiver.snapshot()
                if r.json()["task_id"] == task_id and r.json()["status"] == "succeeded"
            )
            >= 2
        )

    await asyncio.to_thread(receiver.wait_for, repeated, 30)
    assert generated_prompts(adapter) == ["calm sea", "open field"]
    repeat = [
        r.json()
        for r in receiver.snapshot()
        if r.json()["task_id"] == task_id and r.json()["status"] == "succeeded"
    ][-1]
    assert repeat["output"] == first["output"]
    assert await broker.depth(queue) == 0
    assert worker.ready


async def test_a_permanent_error_is_not_retried(
    settings: GenerationSettings, broker: Broker, receiver: Receiver, worker_factory: Any
) -> None:
    adapter = synth(settings)
    task_id = await publish(broker, settings, receiver, "invalid request")
    await worker_factory(adapter)

    failed = await terminal(receiver, task_id)

    assert failed["status"] == "failed"
    assert failed["attempts"] == 1
    assert await dead_letters(broker, SPEC.queue(settings)) == 1


async def test_an_unreadable_message_is_dead_lettered(
    settings: GenerationSettings, broker: Broker, receiver: Receiver, worker_factory: Any
) -> None:
    adapter = synth(settings)
    queue = SPEC.queue(settings)
    await broker.declare(queue)
    await broker.publish(queue, b"{not json", message_id="garbage")
    await worker_factory(adapter)
    good = await publish(broker, settings, receiver, "after the garbage")

    assert (await terminal(receiver, good))["status"] == "succeeded"
    assert await dead_letters(broker, queue) == 1


async def test_a_message_of_a_newer_release_fails_its_task_visibly(
    settings: GenerationSettings, broker: Broker, receiver: Receiver, worker_factory: Any
) -> None:
    """Mid rolling upgrade, an old worker meets a field it does not know: the task
    fails with the reason (record and callback), not silently dead-lettered."""
    queue = SPEC.queue(settings)
    await broker.declare(queue)
    task_id = str(uuid.uuid4())
    message = TaskMessage(
        task_id=task_id,
        prompt="rain",
        duration=1.0,
        kind=Kind.SOUND,
        model="m",
        callback_url=f"{receiver.url}/cb",
    )
    newer = {**json.loads(message.to_bytes()), "melody_url": "https://example.com/tune.wav"}
    await broker.publish(queue, json.dumps(newer).encode(), message_id=task_id)
    await worker_factory(synth(settings))

    failed = await terminal(receiver, task_id)
    assert failed["status"] == "failed" and "melody_url" in failed["error"]
    record = await read_record(settings, task_id)
    assert record is not None and record.status == "failed"
    assert await dead_letters(broker, queue) == 1


async def test_a_task_the_broker_dead_letters_on_its_own_fails_visibly(
    settings: GenerationSettings, broker: Broker, receiver: Receiver, worker_factory: Any
) -> None:
    """Workers lost mid-task at every delivery (a crash before they could count it,
    a connection lost at the last delivery): the queue's delivery limit
    dead-letters the message without a word. A worker's watch of the dead letters
    fails the task with the reason; the operator's dead-letter queue keeps it."""
    adapter = synth(settings)
    task_id = await publish(broker, settings, receiver, "calm sea")
    kv = create_kv(settings)
    store = TaskStore(kv, SPEC.name, 60)
    await store.put(TaskResult(task_id=task_id, kind=Kind.SOUND, status=TaskStatus.RUNNING))
    queue = SPEC.queue(settings)
    deliveries = 0

    async def lost_mid_task(delivery: Any) -> None:
        nonlocal deliveries
        deliveries += 1
        await delivery.requeue()

    await broker.consume(queue, lost_mid_task, prefetch=1)
    for _ in range(500):
        if await broker.dead_letter_depth(queue) == 1:
            break
        await asyncio.sleep(0.01)
    await broker.cancel_consumers()
    assert deliveries == QUEUE_DELIVERY_LIMIT + 1
    await worker_factory(adapter)

    failed = await terminal(receiver, task_id)
    assert failed["status"] == "failed"
    assert f"{QUEUE_DELIVERY_LIMIT + 1} times" in failed["error"], failed["error"]
    record = await store.get(task_id)
    await kv.close()
    assert record is not None and record.status == "failed"
    assert generated_prompts(adapter) == []
    assert await dead_letters(broker, queue) == 1


async def test_a_dead_letter_whose_check_keeps_failing_is_left_to_the_operator(
    settings: GenerationSettings,
    broker: Broker,
    receiver: Receiver,
    worker_factory: Any,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A bug in the watch of the dead letters (its check raises on one message)
    must not spin on that message for ever: the watch queue has no delivery limit,
    so the worker tries a few times, then leaves it to the operator's ``.dlq``."""
    monkeypatch.setattr(worker_module, "_DEAD_LETTER_RETRY_PAUSE_S", 0.01)
    doomed = await publish(broker, settings, receiver, "calm sea")
    queue = SPEC.queue(settings)

    async def dead_letter(delivery: Any) -> None:
        await delivery.dead_letter()

    await broker.consume(queue, dead_letter, prefetch=1)
    assert await dead_letters(broker, queue) == 1
    await broker.cancel_consumers()
    checks = 0

    async def broken_read(task_id: str) -> tuple[TaskResult | None, bytes | None]:
        nonlocal checks
        checks += 1
        raise RuntimeError(f"a bug in the check of {task_id}")

    monkeypatch.setattr(TaskStore, "get_with_holder", lambda self, task_id: broken_read(task_id))
    await worker_factory(synth(settings))
    for _ in range(500):
        if checks >= worker_module._DEAD_LETTER_TRIES:
            break
        await asyncio.sleep(0.01)
    await asyncio.sleep(0.5)  # time for any further try

    assert checks == worker_module._DEAD_LETTER_TRIES
    assert await dead_letters(broker, queue) == 1
    assert [r for r in receiver.snapshot() if r.json()["task_id"] == doomed] == []


async def test_a_dead_letter_of_a_task_that_ended_changes_nothing(
    settings: GenerationSettings, broker: Broker, receiver: Receiver, worker_factory: Any
) -> None:
    """The worker dead-letters a task only after recording its failure: the copy
    it watches finds the task ended and sends no second callback."""
    await worker_factory(synth(settings))
    bad = await publish(broker, settings, receiver, "invalid request")
    assert (await terminal(receiver, bad))["status"] == "failed"
    queue = SPEC.queue(settings)
    await asyncio.sleep(0.5)  # time for the watch to see the copy

    assert [r.json()["status"] for r in receiver.snapshot() if r.json()["task_id"] == bad] == [
        "failed"
    ]
    assert await dead_letters(broker, queue) == 1


@dataclass
class RelayedWorker:
    """A worker whose connection to RabbitMQ goes through ``relay`` (to cut it)."""

    worker: Worker
    adapter: ScriptedAdapter
    relay: TcpProxy


@contextlib.asynccontextmanager
async def worker_through_relay(settings: GenerationSettings) -> AsyncIterator[RelayedWorker]:
    """A ready worker on the synth backend, connected to RabbitMQ through a relay;
    stopped and closed on leaving (its gate opened, the relay accepting again)."""
    relay = TcpProxy(settings.broker_dsn, default_port=5672)
    await relay.start()
    worker_broker = AmqpBroker(relay.url, name="test-relayed-worker")
    await worker_broker.connect()
    kv = create_kv(settings)
    storage = create_storage(settings)
    await storage.ensure_bucket()
    adapter = synth(settings)
    worker = Worker(
        SPEC, settings, broker=worker_broker, kv=kv, storage=storage, adapter=adapter,
        manage_connections=False,
    )  # fmt: skip
    running = asyncio.create_task(worker.run())
    try:
        for _ in range(500):
            if worker.ready:
                break
            await asyncio.sleep(0.01)
        assert worker.ready
        yield RelayedWorker(worker, adapter, relay)
    finally:
        adapter.gate.set()
        relay.refuse_new(False)
        await worker.stop()
        await asyncio.wait_for(running, timeout=30)
        await worker_broker.close()
        await relay.stop()
        await kv.close()
        await storage.close()


async def taken(broker: Broker, queue: QueueSpec) -> None:
    """Wait until a worker has taken what was in ``queue``."""
    for _ in range(500):
        if await broker.depth(queue) == 0:
            return
        await asyncio.sleep(0.01)
    raise AssertionError("the worker did not take the task")


async def test_tasks_waiting_when_the_connection_is_lost_are_generated_once(
    settings: GenerationSettings, broker: Broker, receiver: Receiver
) -> None:
    """The worker's connection to RabbitMQ is lost while one task is in the model
    and another waits for the next batch: RabbitMQ takes both back and delivers them
    again. The copy that waited on the dead channel is dropped (it was generated as
    well, beside its redelivery, or by another worker), and a task is never run
    twice in one batch: each is generated once."""
    queue = SPEC.queue(settings)
    async with worker_through_relay(settings) as relayed:
        relayed.adapter.gate.clear()  # the first batch waits in the model
        first = await publish(broker, settings, receiver, "first in the model")
        await taken(broker, queue)
        await asyncio.sleep(0.5)  # past the batch window: in the model
        second = await publish(broker, settings, receiver, "second waits")
        await taken(broker, queue)
        relayed.relay.cut()  # RabbitMQ takes both back and redelivers them on the new connection
        await asyncio.sleep(2.0)
        relayed.adapter.gate.set()
        for task_id in (first, second):
            assert (await terminal(receiver, task_id))["status"] == "succeeded"
        await asyncio.sleep(1.0)  # any further generation
        prompts = generated_prompts(relayed.adapter)
        assert prompts.count("first in the model") == 1, prompts
        assert prompts.count("second waits") == 1, prompts


async def test_a_task_redelivered_to_another_worker_mid_generation_is_generated_once(
    settings: GenerationSettings,
    broker: Broker,
    receiver: Receiver,
    worker_factory: Any,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """One worker's connection to RabbitMQ is lost while it generates a task (and it
    cannot connect again yet); it goes on generating. RabbitMQ delivers the task
    again, to a second worker: that one waits for the first one's result instead of
    generating the task too, then acks its copy (its callback repeats the result)."""
    monkeypatch.setattr(worker_module, "TASK_CLAIM_CHECK_S", 0.2)
    queue = SPEC.queue(settings)
    async with worker_through_relay(settings) as first:
        first.adapter.gate.clear()  # its batch waits in the model
        task_id = await publish(broker, settings, receiver, "generated once")
        await taken(broker, queue)
        await asyncio.sleep(0.5)  # past the batch window: in the model
        second_adapter = synth(settings)
        await worker_factory(second_adapter)
        first.relay.refuse_new()
        first.relay.cut()  # RabbitMQ takes the task back and delivers it to the second worker
        await asyncio.sleep(2.0)
        assert generated_prompts(second_adapter) == []  # it waits for the first one
        first.adapter.gate.set()
        assert (await terminal(receiver, task_id))["status"] == "succeeded"

        def repeated(_: object) -> bool:
            results = [r.json() for r in receiver.snapshot()]
            succeeded = [r["task_id"] for r in results if r["status"] == "succeeded"]
            return succeeded.count(task_id) == 2

        # The second worker's copy saw the result: it repeats the callback and is acked.
        await asyncio.to_thread(receiver.wait_for, repeated, 10)
        generated = generated_prompts(first.adapter) + generated_prompts(second_adapter)
        assert generated == ["generated once"]
        assert await broker.depth(queue) == 0


async def test_an_mp3_result_states_the_length_its_file_plays(
    settings: GenerationSettings, broker: Broker, receiver: Receiver, worker_factory: Any
) -> None:
    await worker_factory(synth(settings))
    task_id = await publish(broker, settings, receiver, "calm sea", 1.333, AudioFormat.MP3)

    output = (await terminal(receiver, task_id))["output"]

    storage = create_storage(settings)
    try:
        samples, rate = decode(await storage.get(output["key"]))
    finally:
        await storage.close()
    assert output["duration"] == pytest.approx(samples.shape[1] / rate, abs=1e-6)
    assert output["duration"] == pytest.approx(1.333, abs=1e-6)


async def test_progress_is_reported_while_generating(
    settings: GenerationSettings, broker: Broker, receiver: Receiver, worker_factory: Any
) -> None:
    slow = settings.model_copy(update={"synth_step_delay_ms": 20.0})
    from core_base.backends.synth import SynthAdapter

    adapter = ScriptedAdapter(SynthAdapter.from_settings(slow, SPEC))
    await worker_factory(adapter)
    task_id = await publish(broker, settings, receiver, "slow rain", duration=3.0)
    kv = create_kv(settings)
    store = TaskStore(kv, SPEC.name, 60)
    seen: set[float] = set()
    try:
        for _ in range(1000):
            record = await store.get(task_id)
            if record is not None:
                seen.add(record.progress)
                if record.status == "succeeded":
                    break
            await asyncio.sleep(0.02)
    finally:
        await kv.close()
    assert any(0.0 < p < 1.0 for p in seen), seen
    assert 1.0 in seen


async def test_a_hung_s3_holds_the_task_until_it_answers_then_it_completes_once(
    settings: GenerationSettings,
    worker_factory: Any,
    broker: Broker,
    receiver: Receiver,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """S3 stops answering after the audio is generated (connections open, nothing
    comes back): the upload times out and is retried, the message stays unacked,
    and once S3 answers the task succeeds, generated once."""
    caplog.set_level(logging.INFO, logger="core_base.generation.worker")
    assert settings.s3_endpoint_url and settings.aws_access_key and settings.aws_secret_key
    relay = TcpProxy(settings.s3_endpoint_url, default_port=80)
    await relay.start()
    storage = S3Storage(
        bucket=urlsplit(settings.storage_dsn).netloc,
        endpoint_url=relay.url,
        public_url=None,
        region=settings.aws_region_name,
        access_key=settings.aws_access_key.get_secret_value(),
        secret_key=settings.aws_secret_key.get_secret_value(),
        connect_timeout_s=0.5,
        read_timeout_s=0.5,
    )
    try:
        await storage.ensure_bucket()
        adapter = synth(settings)
        await worker_factory(adapter, store=storage)
        relay.freeze()
        prompt = "rain while the store hangs"
        task_id = await publish(broker, settings, receiver, prompt)
        for _ in range(1000):
            if prompt in generated_prompts(adapter):
                break
            await asyncio.sleep(0.01)
        assert prompt in generated_prompts(adapter)
        # The upload times out (botocore's own attempts included), and the worker
        # says it will try again.
        for _ in range(3000):
            if any("dependency unavailable" in r.getMessage() for r in caplog.records):
                break
            await asyncio.sleep(0.01)
        assert any("S3" in r.getMessage() for r in caplog.records), caplog.text
        assert not any(
            r.json()["task_id"] == task_id and r.json()["status"] != "running"
            for r in receiver.snapshot()
        )

        relay.thaw()
        result = await terminal(receiver, task_id, timeout_s=60)
        assert result["status"] == "succeeded", result
        # Which dependency it was: the first failure's reason.
        again = [r.getMessage() for r in caplog.records if "available again" in r.getMessage()]
        assert again and "(it was: S3" in again[0], again
        assert result["attempts"] == 1
        assert generated_prompts(adapter).count(prompt) == 1
        assert await storage.exists(result["output"]["key"])
    finally:
        relay.thaw()
        await storage.close()
        await relay.stop()


def boto3_s3(settings: GenerationSettings) -> Any:
    """A plain boto3 client on the test's S3, to change the store under the worker."""
    assert settings.aws_access_key and settings.aws_secret_key
    return boto3.client(
        "s3",
        endpoint_url=settings.s3_endpoint_url,
        aws_access_key_id=settings.aws_access_key.get_secret_value(),
        aws_secret_access_key=settings.aws_secret_key.get_secret_value(),
        region_name=settings.aws_region_name,
    )


async def test_a_deleted_bucket_holds_the_task_until_it_is_back_and_burns_no_attempt(
    settings: GenerationSettings,
    worker_factory: Any,
    broker: Broker,
    receiver: Receiver,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """S3 answering NoSuchBucket (or 403: keys rotated) is the deployment's problem,
    not the task's: the worker waits it out, readiness shows the storage down, and
    once the bucket is back the task succeeds, generated once, on its first attempt
    (it used to fail for good within ~1.5 s)."""
    caplog.set_level(logging.INFO, logger="core_base.generation.worker")
    adapter = synth(settings)
    worker = await worker_factory(adapter)
    bucket = urlsplit(settings.storage_dsn).netloc
    s3 = boto3_s3(settings)
    await asyncio.to_thread(s3.delete_bucket, Bucket=bucket)
    task_id = await publish(broker, settings, receiver, "wind in a deleted bucket")

    def waits(record: logging.LogRecord) -> bool:
        message = record.getMessage()
        return "dependency unavailable" in message and "S3_BUCKET" in message

    for _ in range(1000):
        if any(map(waits, caplog.records)):
            break
        await asyncio.sleep(0.01)
    assert any(map(waits, caplog.records)), caplog.text
    await asyncio.sleep(1.6)  # two more tries, 0.5 s then 1 s later (one line per 30 s)
    assert "no such bucket" in (await ping_refusal(worker.readiness_checks()["storage"]) or "")
    assert not any(
        r.json()["task_id"] == task_id and r.json()["status"] != "running"
        for r in receiver.snapshot()
    )

    await asyncio.to_thread(s3.create_bucket, Bucket=bucket)
    result = await terminal(receiver, task_id, timeout_s=60)
    assert result["status"] == "succeeded", result
    tries = re.search(r"dependency available again after (\d+) tries", caplog.text)
    assert tries is not None and int(tries.group(1)) >= 3, caplog.text
    assert result["attempts"] == 1
    assert generated_prompts(adapter).count("wind in a deleted bucket") == 1
    assert await worker.readiness_checks()["storage"]() is True


@contextlib.asynccontextmanager
async def s3_refusing_uploads(status: int, code: str) -> AsyncIterator[str]:
    """A fake S3 endpoint that has the bucket (HeadBucket: 200) and refuses every
    upload with ``status`` and ``code``; yields its URL."""

    async def handle(request: web.Request) -> web.Response:
        if request.method != "PUT":
            return web.Response(status=200)
        await request.read()
        return web.Response(status=status, body=f"<Error><Code>{code}</Code></Error>".encode())

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", handle)
    runner = web.AppRunner(app)
    await runner.setup()
    port = free_port()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        await runner.cleanup()


async def test_an_upload_refused_for_itself_still_fails_its_task(
    settings: GenerationSettings, worker_factory: Any, broker: Broker, receiver: Receiver
) -> None:
    """Only the refusals that blame the settings are waited out: one of the upload
    itself (400 EntityTooLarge) fails the task after its attempts, as before."""
    async with s3_refusing_uploads(400, "EntityTooLarge") as url:
        storage = S3Storage(
            bucket="refusing",
            endpoint_url=url,
            public_url=None,
            region="us-east-1",
            access_key="testing",
            secret_key="testing",
        )
        try:
            await worker_factory(synth(settings), store=storage)
            task_id = await publish(broker, settings, receiver, "too large to keep")
            failed = await terminal(receiver, task_id)
        finally:
            await storage.close()
    assert failed["status"] == "failed"
    assert "EntityTooLarge" in failed["error"]
    assert failed["attempts"] == MAX_TASK_ATTEMPTS
