"""Two workers in one process (as in ``dev``) load and warm up their models one
after the other: a first generation imports more of the model libraries, and two
threads importing through transformers at once can fail (core_base/generation/load_lock.py)."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Sequence
from pathlib import Path

from core_base.backends.synth import SynthAdapter
from core_base.generation.load_lock import one_load_at_a_time
from core_base.generation.models import (
    GeneratedAudio,
    GenerationItem,
    LoadProgressCallback,
    ProgressCallback,
)
from core_base.generation.worker import Worker
from music_gen.service import SPEC
from tests.support.workers import embedded_worker

timeline: list[str] = []
timeline_lock = threading.Lock()


def note(event: str) -> None:
    with timeline_lock:
        timeline.append(event)


class SlowStartAdapter(SynthAdapter):
    """The synth backend, with a load and a first generation that take a while."""

    def load(self, progress: LoadProgressCallback | None = None) -> None:
        note(f"{self.model_id} load")
        time.sleep(0.05)
        super().load(progress)

    def generate(
        self, batch: Sequence[GenerationItem], progress: ProgressCallback | None = None
    ) -> list[GeneratedAudio]:
        note(f"{self.model_id} warm-up starts")
        time.sleep(0.2)
        audio = super().generate(batch, progress)
        note(f"{self.model_id} warm-up ends")
        return audio


def worker_named(name: str, tmp_path: Path) -> Worker:
    adapter = SlowStartAdapter(model_id=name, sample_rate=SPEC.sample_rate, kind=SPEC.kind)
    return embedded_worker(SPEC, tmp_path / name, adapter)


async def test_two_workers_load_and_warm_up_one_after_the_other(tmp_path: Path) -> None:
    timeline.clear()
    workers = [worker_named("a", tmp_path), worker_named("b", tmp_path)]
    running = [asyncio.create_task(worker.run()) for worker in workers]
    try:
        for _ in range(500):
            if all(worker.ready for worker in workers):
                break
            await asyncio.sleep(0.01)
        assert all(worker.ready for worker in workers)
    finally:
        for worker in workers:
            await worker.stop()
        await asyncio.wait_for(asyncio.gather(*running), timeout=10)
    first = timeline[0].split()[0]
    second = "b" if first == "a" else "a"
    steps = ["load", "warm-up starts", "warm-up ends"]
    assert timeline == [f"{first} {step}" for step in steps] + [
        f"{second} {step}" for step in steps
    ]


class RecordingAdapter(SynthAdapter):
    loads = 0

    def load(self, progress: LoadProgressCallback | None = None) -> None:
        RecordingAdapter.loads += 1
        super().load(progress)


async def test_a_stop_while_waiting_for_another_load_loads_nothing(tmp_path: Path) -> None:
    """Otherwise the process could exit only after loading a model nobody needs."""
    adapter = RecordingAdapter(model_id="waiting", sample_rate=SPEC.sample_rate, kind=SPEC.kind)
    worker = embedded_worker(SPEC, tmp_path, adapter)
    waits: list[str] = []
    # Another model's load, in this (the event loop's) thread.
    with one_load_at_a_time(lambda fraction, message: None):
        running = asyncio.create_task(worker.run())
        for _ in range(500):
            if worker.state == "loading":
                break
            await asyncio.sleep(0.01)
        await asyncio.sleep(0.3)  # the model thread is waiting for the lock by now
        await worker.stop()
        await asyncio.wait_for(running, timeout=10)
        waits.append(worker.state)
    # The lock is free: a model thread still waiting would load now.
    await asyncio.to_thread(worker._model_thread.shutdown, wait=True)
    assert waits == ["stopped"]
    assert RecordingAdapter.loads == 0
