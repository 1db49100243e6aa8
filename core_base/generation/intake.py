"""The worker's inbox: tasks received from the broker, waiting for a batch."""

from __future__ import annotations

import asyncio
import time
from collections import deque
from collections.abc import Hashable, Sequence
from dataclasses import dataclass, field

from core_base.contracts import TaskMessage
from core_base.ports.broker import Delivery


@dataclass(eq=False)
class Pending:
    """A received task waiting for (or in) a batch. The delivery handler waits on
    ``settled`` so the broker's prefetch counts it until it is acked."""

    delivery: Delivery
    message: TaskMessage
    settled: asyncio.Event = field(default_factory=asyncio.Event)
    # This generation of the task is its n-th (see Worker._process_group): starts
    # are counted, not deliveries, which include hand-backs of tasks never started.
    attempt: int = 1
    # Worker._batch_key's answer, kept: a task held for a later batch is grouped
    # again at every pull (its key may tokenize the prompt).
    batch_key: Hashable | None = None
    # This worker recorded the task's final result (or failure), or found it recorded.
    recorded: bool = False
    # Handed to wait for another worker's result by the group it came in.
    waited: bool = False


class Inbox:
    def __init__(self) -> None:
        self._queue: asyncio.Queue[Pending] = asyncio.Queue()
        # Taken for a batch but not run with it: first in line for the next.
        self._held: deque[Pending] = deque()

    async def put(self, pending: Pending) -> None:
        await self._queue.put(pending)

    def hold(self, pendings: Sequence[Pending]) -> None:
        """Put tasks taken but not run back at the head of the line, in order."""
        self._held.extendleft(reversed(pendings))

    def take_all(self) -> list[Pending]:
        """Everything waiting, at once (to give it back on shutdown)."""
        taken = list(self._held)
        self._held.clear()
        while not self._queue.empty():
            taken.append(self._queue.get_nowait())
        return taken

    async def next_batch(
        self, *, max_size: int, wait_s: float, stop: asyncio.Event
    ) -> list[Pending] | None:
        """Wait for a task (None once ``stop`` is set), then for up to ``wait_s``
        more for company; tasks already received always join, up to ``max_size``.
        Held tasks come first, and do not wait."""
        if self._held:
            batch = [self._held.popleft() for _ in range(min(max_size, len(self._held)))]
            while len(batch) < max_size and not self._queue.empty():
                batch.append(self._queue.get_nowait())
            return batch
        getter = asyncio.ensure_future(self._queue.get())
        stopper = asyncio.ensure_future(stop.wait())
        done, _ = await asyncio.wait({getter, stopper}, return_when=asyncio.FIRST_COMPLETED)
        stopper.cancel()
        if getter not in done:
            getter.cancel()
            return None
        batch = [getter.result()]
        deadline = time.monotonic() + wait_s
        while len(batch) < max_size:
            if not self._queue.empty():
                batch.append(self._queue.get_nowait())
                continue
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                break
            try:
                batch.append(await asyncio.wait_for(self._queue.get(), timeout=remaining))
            except TimeoutError:
                break
        return batch
