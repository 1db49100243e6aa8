"""Coalescing concurrent requests into one round trip (group commit).

Under load, many calls want the same kind of write at once. A ``Coalescer``
runs one ``flush`` at a time: the first item is flushed on the next turn of
the event loop (no added wait when idle), and whatever arrives while a flush
is in flight goes into the next one. The batch size follows the load by
itself; the latency added is at most one flush.

A flush that fails with one of ``fails_waiting`` (the database did not answer in
time: it hangs) fails what waits for the next flush too: those items came in
while the store hung, and would otherwise wait out a whole second timeout of
their own. Other failures (a connection that broke at once) leave them to their
own flush.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable, Sequence
from typing import Generic, TypeVar

Item = TypeVar("Item")
Result = TypeVar("Result")


class Coalescer(Generic[Item, Result]):
    """``submit`` items; ``flush`` gets lists of them and returns a result per item
    (in order). A flush that raises fails every item of its batch."""

    def __init__(
        self,
        flush: Callable[[Sequence[Item]], Awaitable[Sequence[Result]]],
        *,
        max_batch: int,
        fails_waiting: tuple[type[Exception], ...] = (),
    ) -> None:
        self._flush = flush
        self._max_batch = max_batch
        self._fails_waiting = fails_waiting
        self._pending: list[tuple[Item, asyncio.Future[Result]]] = []
        self._runner: asyncio.Task[None] | None = None

    def submit(self, item: Item) -> asyncio.Future[Result]:
        """Queue ``item``; the future holds its result once its batch is flushed."""
        future: asyncio.Future[Result] = asyncio.get_running_loop().create_future()
        self._pending.append((item, future))
        if self._runner is None:
            self._runner = asyncio.create_task(self._run())
        return future

    async def close(self) -> None:
        """Wait until everything submitted has been flushed."""
        if self._runner is not None:
            with contextlib.suppress(Exception):
                await asyncio.shield(self._runner)

    async def _run(self) -> None:
        try:
            while self._pending:
                batch = self._pending[: self._max_batch]
                del self._pending[: self._max_batch]
                await self._flush_batch(batch)
        finally:
            self._runner = None

    async def _flush_batch(self, batch: list[tuple[Item, asyncio.Future[Result]]]) -> None:
        try:
            results = await self._flush([item for item, _ in batch])
            if len(results) != len(batch):
                raise RuntimeError(f"flush returned {len(results)} results for {len(batch)}")
        except BaseException as exc:
            failure = exc if isinstance(exc, Exception) else RuntimeError("flush cancelled")
            if isinstance(failure, self._fails_waiting):
                batch, self._pending = batch + self._pending, []
            for _, future in batch:
                if not future.done():
                    future.set_exception(failure)
            if failure is not exc:
                raise
            return
        for (_, future), result in zip(batch, results, strict=True):
            if not future.done():
                future.set_result(result)
