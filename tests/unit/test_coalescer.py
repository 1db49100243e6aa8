"""The group-commit helper: batches follow the load, results and failures reach
their own callers, nothing submitted is dropped."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence

import pytest

from app_api.coalescer import Coalescer


class Recorder:
    def __init__(self, fail_on: int | None = None) -> None:
        self.batches: list[list[int]] = []
        self.fail_on = fail_on
        self.release = asyncio.Event()
        self.release.set()

    async def flush(self, items: Sequence[int]) -> list[int]:
        self.batches.append(list(items))
        await self.release.wait()
        if self.fail_on is not None and self.fail_on in items:
            raise ValueError(f"refused {self.fail_on}")
        return [item * 10 for item in items]


async def test_items_submitted_together_share_one_flush() -> None:
    recorder = Recorder()
    coalescer = Coalescer(recorder.flush, max_batch=100)
    results = await asyncio.gather(*(coalescer.submit(i) for i in range(5)))
    assert results == [0, 10, 20, 30, 40]
    assert recorder.batches == [[0, 1, 2, 3, 4]]


async def test_items_arriving_during_a_flush_go_into_the_next_one() -> None:
    recorder = Recorder()
    recorder.release.clear()
    coalescer = Coalescer(recorder.flush, max_batch=100)
    first = coalescer.submit(1)
    await asyncio.sleep(0)  # the first flush starts and waits
    later = [coalescer.submit(i) for i in (2, 3, 4)]
    recorder.release.set()
    assert await first == 10
    assert await asyncio.gather(*later) == [20, 30, 40]
    assert recorder.batches == [[1], [2, 3, 4]]


async def test_batches_are_capped() -> None:
    recorder = Recorder()
    coalescer = Coalescer(recorder.flush, max_batch=2)
    assert await asyncio.gather(*(coalescer.submit(i) for i in range(5))) == [0, 10, 20, 30, 40]
    assert recorder.batches == [[0, 1], [2, 3], [4]]


async def test_a_failed_flush_fails_its_batch_only() -> None:
    recorder = Recorder(fail_on=1)
    coalescer = Coalescer(recorder.flush, max_batch=2)
    futures = [coalescer.submit(i) for i in range(4)]
    for future in futures[:2]:
        with pytest.raises(ValueError, match="refused 1"):
            await future
    assert await asyncio.gather(*futures[2:]) == [20, 30]


class StoreTimedOut(Exception):
    pass


async def test_a_flush_timing_out_fails_what_waits_behind_it_too() -> None:
    """Items that came in while the store hung would wait out a second timeout of
    their own; other failures leave them to their own flush."""
    recorder = Recorder()
    recorder.release.clear()

    async def times_out(items: Sequence[int]) -> list[int]:
        if 1 in items:
            await recorder.release.wait()
            raise StoreTimedOut("no answer in time")
        return await recorder.flush(items)

    coalescer = Coalescer(times_out, max_batch=10, fails_waiting=(StoreTimedOut,))
    first = coalescer.submit(1)
    await asyncio.sleep(0)  # in flight, hanging
    behind = [coalescer.submit(i) for i in (2, 3)]
    recorder.release.set()
    for future in [first, *behind]:
        with pytest.raises(StoreTimedOut):
            await future
    assert recorder.batches == []  # 2 and 3 never went to the store
    assert await coalescer.submit(4) == 40  # and the next flush goes ahead


async def test_close_waits_for_what_was_submitted() -> None:
    recorder = Recorder()
    recorder.release.clear()
    coalescer = Coalescer(recorder.flush, max_batch=10)
    future = coalescer.submit(7)
    await asyncio.sleep(0)
    closing = asyncio.create_task(coalescer.close())
    await asyncio.sleep(0.01)
    assert not closing.done()
    recorder.release.set()
    await closing
    assert future.done() and future.result() == 70
