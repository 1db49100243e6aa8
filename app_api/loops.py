"""Background loops: run a step, then sleep until woken or the interval passes."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable
from typing import Any

logger = logging.getLogger(__name__)


class Loop:
    """Runs ``step`` until stopped. A failing step is logged and retried next round,
    so a database blip never ends the loop. ``wake()`` runs the next round now (or
    right after the round in progress)."""

    def __init__(self, name: str, step: Callable[[], Awaitable[Any]], interval_s: float) -> None:
        self.name = name
        self._step = step
        self._interval_s = interval_s
        self._woken = False
        # Set while the loop sleeps. A bare future rather than an Event awaited under
        # wait_for: a wake then resumes the loop on the event loop's next turn,
        # where wait_for took three (a new workflow's fan-out waits for it).
        self._sleeping: asyncio.Future[None] | None = None
        self._stopping = False
        self._task: asyncio.Task[None] | None = None

    def wake(self) -> None:
        self._woken = True
        if self._sleeping is not None and not self._sleeping.done():
            self._sleeping.set_result(None)

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.create_task(self._run(), name=self.name)

    async def stop(self) -> None:
        self._stopping = True
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        while not self._stopping:
            self._woken = False
            try:
                await self._step()
            except asyncio.CancelledError:
                raise
            except Exception:
                logger.exception("%s: round failed; retrying", self.name)
            if not self._woken:
                await self._sleep(loop)

    async def _sleep(self, loop: asyncio.AbstractEventLoop) -> None:
        self._sleeping = sleeping = loop.create_future()
        timer = loop.call_later(self._interval_s, _resolve, sleeping)
        try:
            await sleeping
        finally:
            timer.cancel()
            self._sleeping = None


def _resolve(future: asyncio.Future[None]) -> None:
    if not future.done():
        future.set_result(None)
