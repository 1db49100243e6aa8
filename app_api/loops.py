"""Background loops: run a step, then sleep until woken or the interval passes.

A failing step is retried with a growing pause, and reported once when it starts
failing, then every half minute while it goes on, then once when it works again:
during a database outage every loop fails every round, and a traceback per
round and loop buried the log (thousands of lines in half a minute).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any

from core_base.errors import UnavailableError

logger = logging.getLogger(__name__)


# Longest pause after failed rounds (unless the interval is longer): a dependency
# that comes back is used again within seconds.
MAX_BACKOFF_S = 10.0
# While a step keeps failing, it is reported this often.
REPORT_EVERY_S = 30.0


class Loop:
    """Runs ``step`` until stopped. A failing step is logged and retried after a
    pause that doubles up to ``MAX_BACKOFF_S``, so a database blip never ends the
    loop. ``wake()`` runs the next round now, or right after a round in progress
    that succeeds; a wake during a pause after a failure cuts it short (new work
    may find the dependency back), one during the failing round does not (a loop
    woken all the time would otherwise retry a dead dependency without pause)."""

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
        self._failures = 0  # rounds failed in a row
        self._reported_at = 0.0

    def wake(self) -> None:
        self._woken = True
        if self._sleeping is not None and not self._sleeping.done():
            self._sleeping.set_result(None)

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.create_task(self._run(), name=self.name)

    async def stop(self, grace_s: float = 0.0) -> None:
        """End the loop: a round under way gets ``grace_s`` to finish (no other
        starts), then it is cancelled."""
        self._stopping = True
        task, self._task = self._task, None
        if task is None:
            return
        self.wake()  # a pause ends at once
        if grace_s > 0:
            await asyncio.wait({task}, timeout=grace_s)
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
            except Exception as exc:
                self._report_failure(exc)
                if not self._stopping:
                    await self._pause(loop, self._backoff_s())
                continue
            if self._failures:
                logger.info("%s: working again after %d failed rounds", self.name, self._failures)
                self._failures = 0
            if not self._woken and not self._stopping:
                await self._pause(loop, self._interval_s)

    def _backoff_s(self) -> float:
        doubled: float = self._interval_s * 2.0 ** min(self._failures - 1, 16)
        return max(self._interval_s, min(MAX_BACKOFF_S, doubled))

    def _report_failure(self, exc: Exception) -> None:
        self._failures += 1
        now = time.monotonic()
        if self._failures > 1 and now - self._reported_at < REPORT_EVERY_S:
            return
        self._reported_at = now
        if isinstance(exc, UnavailableError):
            # An outage, already named by the error: no traceback to read.
            logger.warning(
                "%s: %s (%d failed rounds in a row); retrying", self.name, exc, self._failures
            )
        else:
            logger.error(
                "%s: round failed (%d in a row); retrying", self.name, self._failures, exc_info=exc
            )

    async def _pause(self, loop: asyncio.AbstractEventLoop, seconds: float) -> None:
        self._sleeping = sleeping = loop.create_future()
        timer = loop.call_later(seconds, _resolve, sleeping)
        try:
            await sleeping
        finally:
            timer.cancel()
            self._sleeping = None


def _resolve(future: asyncio.Future[None]) -> None:
    if not future.done():
        future.set_result(None)
