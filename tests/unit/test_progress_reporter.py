"""Generation progress reaches the task store at a bounded rate: nothing in the
first PROGRESS_MIN_INTERVAL_S (a short generation writes none), then at most
once per interval, and the last step of a long one."""

from __future__ import annotations

import asyncio

from core_base.adapters.kv_memory import MemoryStore
from core_base.constants import PROGRESS_MIN_INTERVAL_S
from core_base.generation.progress import progress_reporter
from core_base.generation.task_store import TaskStore, progress_key

INTERVAL = PROGRESS_MIN_INTERVAL_S


class RecordingStore(MemoryStore):
    def __init__(self) -> None:
        super().__init__()
        self.progress: list[float] = []

    async def set(self, key: str, value: bytes, *, ttl_s: float | None = None) -> None:
        if key == progress_key("audio_gen", "t-1"):
            self.progress.append(float(value))
        await super().set(key, value, ttl_s=ttl_s)


async def reported(steps: list[tuple[float, int]], total: int) -> list[float]:
    """Drive a reporter from the model thread with ``(seconds since start, step
    done)`` pairs; returns the progress values written."""
    kv = RecordingStore()
    now = [0.0]
    report = progress_reporter(
        TaskStore(kv, "audio_gen", 60), ["t-1"], asyncio.get_running_loop(), lambda: now[0]
    )

    def generate() -> None:
        for at_s, done in steps:
            now[0] = at_s
            report(done, total)

    await asyncio.to_thread(generate)
    for _ in range(20):  # the writes run on this loop
        await asyncio.sleep(0)
    return kv.progress


async def test_a_generation_shorter_than_the_interval_writes_nothing() -> None:
    steps = [(0.01 * step, step) for step in range(1, 11)]

    assert await reported(steps, total=10) == []


async def test_a_long_generation_writes_once_per_interval_and_its_last_step() -> None:
    # One step every 0.2 intervals: 25 steps take 5 intervals.
    steps = [(0.2 * INTERVAL * step, step) for step in range(1, 26)]

    written = await reported(steps, total=25)

    assert written == [0.2, 0.4, 0.6, 0.8, 1.0]
