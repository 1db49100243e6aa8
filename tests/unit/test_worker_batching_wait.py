"""The worker's wait for batch-mates: bounded by WORKER_BATCH_WINDOW_MS and by a
fraction of the last generation time, and never leaving received tasks behind."""

from __future__ import annotations

import asyncio
from collections.abc import Hashable, Sequence
from pathlib import Path
from typing import ClassVar

import pytest

from audio_gen.service import SPEC
from core_base.adapters.broker_memory import MemoryBroker
from core_base.adapters.kv_memory import MemoryStore
from core_base.backends.synth import SynthAdapter
from core_base.constants import BATCH_WAIT_FRACTION
from core_base.contracts import TaskMessage
from core_base.generation.batching import group_compatible
from core_base.generation.intake import Inbox, Pending
from core_base.generation.models import GeneratedAudio, GenerationItem, ProgressCallback
from core_base.generation.task_store import TaskStore
from core_base.generation.worker import Worker
from core_base.ports.broker import Delivery
from tests.support.workers import embedded_worker


def make_worker(tmp_path: Path, window_ms: int, batch_size: int = 4) -> Worker:
    return embedded_worker(
        SPEC, tmp_path, worker_batch_window_ms=window_ms, worker_batch_size=batch_size
    )


def pending_tasks(messages: Sequence[TaskMessage]) -> list[Pending]:
    """As the inbox holds them, received once each."""
    return [Pending(Delivery(b"", m.task_id, 1), m) for m in messages]


@pytest.mark.parametrize(
    ("window_ms", "last_generation_s", "expected_s"),
    [
        (50, 0.02, BATCH_WAIT_FRACTION * 0.02),  # fast backend: a sliver of its time
        (50, 10.0, 0.05),  # slow model: the configured window
        (0, 10.0, 0.0),  # batching wait switched off
    ],
)
def test_wait_is_the_smaller_of_window_and_a_fraction_of_generation(
    tmp_path: Path, window_ms: int, last_generation_s: float, expected_s: float
) -> None:
    worker = make_worker(tmp_path, window_ms)
    worker._last_generation_s = last_generation_s
    assert worker.batch_wait_s() == pytest.approx(expected_s)


async def test_tasks_already_received_join_the_batch_even_without_waiting() -> None:
    inbox = Inbox()
    for index in range(5):
        message = TaskMessage(task_id=f"t{index}", prompt="p", kind=SPEC.kind, model="m")
        await inbox.put(Pending(Delivery(b"", f"t{index}", 1), message))

    stop = asyncio.Event()
    first = await asyncio.wait_for(inbox.next_batch(max_size=3, wait_s=0, stop=stop), timeout=5)
    second = await asyncio.wait_for(inbox.next_batch(max_size=3, wait_s=0, stop=stop), timeout=5)

    assert first is not None and second is not None
    assert [p.message.task_id for p in first] == ["t0", "t1", "t2"]
    assert [p.message.task_id for p in second] == ["t3", "t4"]


async def test_a_stop_ends_the_wait_for_the_next_batch() -> None:
    inbox = Inbox()
    stop = asyncio.Event()
    waiting = asyncio.create_task(inbox.next_batch(max_size=3, wait_s=0, stop=stop))
    stop.set()
    assert await asyncio.wait_for(waiting, timeout=5) is None


class WordCountKeyed(SynthAdapter):
    """A backend whose batches must share the prompts' word counts."""

    def prompt_batch_key(self, prompt: str) -> Hashable:
        return len(prompt.split())


def test_the_backends_prompt_key_splits_batches(tmp_path: Path) -> None:
    """A batch the backend would have to run in several passes is several batches:
    each is delivered when its own pass ends, and batch sizes are what ran."""
    adapter = WordCountKeyed(model_id="keyed", sample_rate=SPEC.sample_rate, kind=SPEC.kind)
    worker = embedded_worker(SPEC, tmp_path, adapter, worker_batch_size=4)
    prompts = ["rain", "a dog barks", "wind", "a cat meows", "thunder"]
    pending = pending_tasks(
        [
            TaskMessage(task_id=f"t{index}", prompt=prompt, kind=SPEC.kind, model="m")
            for index, prompt in enumerate(prompts)
        ]
    )
    groups = group_compatible(pending, worker._batch_key, 4)
    assert [[p.message.prompt for p in group] for group in groups] == [
        ["rain", "wind", "thunder"],
        ["a dog barks", "a cat meows"],
    ]


class RoundingBackend(SynthAdapter):
    """A backend whose batched output rounds differently from one item alone."""

    batch_invariant = False


def test_seeded_tasks_run_alone_on_a_backend_that_rounds_by_batch(tmp_path: Path) -> None:
    """SPEC §3: the same seed gives the same audio, which batched float rounding
    can break in a long generation; WORKER_BATCH_SEEDED=true trades that for
    throughput."""
    seeds = [7, None, 8, None, 7]

    def batches(backend: type[SynthAdapter], batch_seeded: bool) -> list[list[str]]:
        adapter = backend(model_id="m", sample_rate=SPEC.sample_rate, kind=SPEC.kind)
        worker = embedded_worker(
            SPEC, tmp_path, adapter, worker_batch_size=8, worker_batch_seeded=batch_seeded
        )
        pending = pending_tasks(
            [
                TaskMessage(task_id=f"t{i}", prompt="rain", kind=SPEC.kind, model="m", seed=seed)
                for i, seed in enumerate(seeds)
            ]
        )
        groups = group_compatible(pending, worker._batch_key, 8)
        return [[p.message.task_id for p in group] for group in groups]

    assert batches(RoundingBackend, batch_seeded=False) == [["t0"], ["t1", "t3"], ["t2"], ["t4"]]
    assert batches(RoundingBackend, batch_seeded=True) == [["t0", "t1", "t2", "t3", "t4"]]
    # synth makes each item on its own: nothing to protect.
    assert batches(SynthAdapter, batch_seeded=False) == [["t0", "t1", "t2", "t3", "t4"]]


class RecordingRoundingBackend(SynthAdapter):
    """Rounds by batch (so seeded tasks run alone), and records each generate call."""

    batch_invariant = False
    calls: ClassVar[list[list[str]]] = []

    def generate(
        self, batch: Sequence[GenerationItem], progress: ProgressCallback | None = None
    ) -> list[GeneratedAudio]:
        RecordingRoundingBackend.calls.append([item.prompt for item in batch])
        return super().generate(batch, progress)


async def test_tasks_left_out_of_a_batch_are_first_in_line_for_the_next(tmp_path: Path) -> None:
    """A seeded task runs alone; the unseeded tasks taken with it wait at the head of
    the line, where the next ones join them, instead of running as a short batch."""
    broker, kv = MemoryBroker(), MemoryStore()
    # Steps of 60 ms: a warm-up of 1.5 s, so a batch waits 150 ms for company.
    adapter = RecordingRoundingBackend(
        model_id="m", sample_rate=SPEC.sample_rate, kind=SPEC.kind, step_delay_s=0.06
    )
    RecordingRoundingBackend.calls = []
    worker = embedded_worker(
        SPEC,
        tmp_path,
        adapter,
        broker=broker,
        kv=kv,
        worker_batch_size=4,
        worker_batch_window_ms=1000,
    )
    queue = SPEC.queue(worker.settings)
    await broker.connect()
    await broker.declare(queue)
    tasks = [("s1", 7), ("u1", None), ("s2", 8), ("u2", None), ("u3", None), ("u4", None)]
    for task_id, seed in tasks:
        message = TaskMessage(
            task_id=task_id, prompt=task_id, kind=SPEC.kind, model="m", duration=0.1, seed=seed
        )
        await broker.publish(queue, message.to_bytes(), message_id=task_id)
    running = asyncio.create_task(worker.run())
    try:
        store = TaskStore(kv, SPEC.name, 60)
        for _ in range(1000):
            records = await store.get_many([task_id for task_id, _ in tasks])
            if all(r is not None and r.status == "succeeded" for r in records):
                break
            await asyncio.sleep(0.01)
    finally:
        await worker.stop()
        await asyncio.wait_for(running, timeout=10)
    calls = RecordingRoundingBackend.calls[1:]  # the first is the warm-up
    # Taken four at a time: s1 runs alone, u1 and u2 wait first in line and run
    # with u3 (they ran as a pair before); then s2 alone; then u4.
    assert calls == [["s1"], ["u1", "u2", "u3"], ["s2"], ["u4"]]
