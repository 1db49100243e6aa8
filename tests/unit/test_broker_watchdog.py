"""A process whose broker adapter gave up reconnecting exits (with an error) so
that its supervisor restarts it, instead of idling with a green /healthz."""

from __future__ import annotations

import asyncio

import pytest

from core_base.adapters.broker_memory import MemoryBroker
from core_base.errors import UnavailableError
from core_base.generation.process import watch_broker
from core_base.http.server import run_until_signalled


class GivingUpBroker(MemoryBroker):
    def __init__(self) -> None:
        super().__init__()
        self.failed = False

    @property
    def gave_up(self) -> bool:
        return self.failed


async def test_the_process_ends_with_an_error_once_the_broker_gave_up() -> None:
    broker = GivingUpBroker()
    stopped = asyncio.Event()

    async def serve() -> None:  # stands in for the HTTP server / worker
        await stopped.wait()

    async def stop() -> None:
        stopped.set()

    running = asyncio.create_task(
        run_until_signalled([serve], stop, watchers=[lambda: watch_broker(broker, interval_s=0.01)])
    )
    await asyncio.sleep(0.05)
    assert not running.done()  # a healthy broker keeps the process up

    broker.failed = True

    with pytest.raises(UnavailableError, match="RabbitMQ"):
        await asyncio.wait_for(running, timeout=5)
    assert stopped.is_set()  # the other components were stopped first


async def test_a_normal_stop_does_not_wait_for_the_watchdog() -> None:
    broker = GivingUpBroker()
    done = asyncio.Event()

    async def finishes() -> None:
        done.set()

    async def stop() -> None:
        pass

    await asyncio.wait_for(
        run_until_signalled(
            [finishes], stop, watchers=[lambda: watch_broker(broker, interval_s=0.01)]
        ),
        timeout=5,
    )
    assert done.is_set()
