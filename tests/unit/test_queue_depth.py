"""``QueueDepth``: a reading is reused for ``max_age_s``; then, up to ``max_stale_s``,
answered while a fresh one is read beside it; older, callers wait for the read.
Concurrent callers share one read; a failed read raises and the next caller reads
again."""

from __future__ import annotations

import asyncio
import logging

import pytest

from core_base.adapters.broker_memory import MemoryBroker
from core_base.errors import UnavailableError
from core_base.generation.queue_depth import QueueDepth
from core_base.ports.broker import QueueSpec

QUEUE = QueueSpec("depth-test", delivery_limit=3)


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


async def publish(broker: MemoryBroker, count: int) -> None:
    for index in range(count):
        await broker.publish(QUEUE, b"{}", message_id=f"m{index}-{id(broker)}")


@pytest.fixture
async def broker() -> MemoryBroker:
    memory = MemoryBroker()
    await memory.connect()
    await memory.declare(QUEUE)
    return memory


async def settle() -> None:
    """Let a read started in the background finish (the memory broker answers at once)."""
    for _ in range(5):
        await asyncio.sleep(0)


async def read_two(broker: MemoryBroker, clock: Clock) -> QueueDepth:
    """A QueueDepth (fresh for 0.5 s, stale up to 5 s) that has read 2 tasks."""
    depth = QueueDepth(broker, QUEUE, max_age_s=0.5, max_stale_s=5.0, clock=clock)
    await publish(broker, 2)
    assert await depth.current() == 2
    return depth


async def test_a_reading_is_reused_until_it_is_too_old(broker: MemoryBroker) -> None:
    clock = Clock()
    depth = await read_two(broker, clock)
    await publish(broker, 3)
    clock.now += 0.4
    assert await depth.current() == 2
    await settle()
    assert await depth.current() == 2  # still fresh: nothing was read meanwhile


async def test_a_stale_reading_answers_while_a_fresh_one_is_read(broker: MemoryBroker) -> None:
    clock = Clock()
    depth = await read_two(broker, clock)
    await publish(broker, 3)
    clock.now += 0.6
    assert await depth.current() == 2  # at once, from the reading 0.6 s old
    await settle()
    assert await depth.current() == 5  # the one read meanwhile


async def test_after_a_quiet_spell_the_caller_waits_for_a_fresh_reading(
    broker: MemoryBroker,
) -> None:
    clock = Clock()
    depth = await read_two(broker, clock)
    await publish(broker, 3)
    clock.now += 5.0
    assert await depth.current() == 5


async def test_a_broker_gone_is_seen_once_the_last_reading_is_too_stale(
    broker: MemoryBroker, caplog: pytest.LogCaptureFixture
) -> None:
    clock = Clock()
    depth = await read_two(broker, clock)
    await broker.close()
    clock.now += 1.0
    with caplog.at_level(logging.INFO, logger="core_base.generation.queue_depth"):
        assert await depth.current() == 2  # the background read fails: only logged
        await settle()
        clock.now += 1.0
        assert await depth.current() == 2  # and fails again: logged once
        await settle()
        clock.now += 3.0
        with pytest.raises(UnavailableError):
            await depth.current()
        failures = [r for r in caplog.records if r.levelno == logging.WARNING]
        assert len(failures) == 1, caplog.text
        assert "depth-test" in failures[0].getMessage()
        await broker.connect()
        await broker.declare(QUEUE)
        assert await depth.current() == 2
        assert caplog.records[-1].getMessage() == "reading the depth of queue depth-test again"


async def test_concurrent_callers_share_one_read(broker: MemoryBroker) -> None:
    reads = 0
    real_depth = broker.depth

    async def counted_depth(queue: QueueSpec) -> int:
        nonlocal reads
        reads += 1
        await asyncio.sleep(0.01)
        return await real_depth(queue)

    broker.depth = counted_depth  # type: ignore[method-assign]
    await publish(broker, 4)
    depth = QueueDepth(broker, QUEUE)
    assert await asyncio.gather(*(depth.current() for _ in range(10))) == [4] * 10
    assert reads == 1


async def test_a_failed_read_raises_and_the_next_caller_reads_again(
    broker: MemoryBroker,
) -> None:
    depth = QueueDepth(broker, QUEUE)
    await broker.close()
    with pytest.raises(UnavailableError):
        await depth.current()
    await broker.connect()
    await broker.declare(QUEUE)
    await publish(broker, 1)
    assert await depth.current() == 1
