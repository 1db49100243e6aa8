"""Generation progress, from the model thread to the task store, at a bounded rate."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Sequence

from core_base.constants import PROGRESS_MIN_INTERVAL_S
from core_base.generation.models import ProgressCallback
from core_base.generation.task_store import TaskStore

logger = logging.getLogger(__name__)


def progress_reporter(
    store: TaskStore,
    task_ids: Sequence[str],
    loop: asyncio.AbstractEventLoop,
    clock: Callable[[], float] = time.monotonic,
) -> ProgressCallback:
    """A ``progress(done, total)`` callback for the adapter. It runs in the model
    thread, so it only schedules the writes on the event loop: at most every
    PROGRESS_MIN_INTERVAL_S, the first that long after the start, and the last step
    once the generation has run that long. A shorter generation writes none: its
    result, moments later, says more."""
    started = clock()
    last_sent = started
    ids = list(task_ids)

    def report(done: int, total: int) -> None:
        nonlocal last_sent
        now = clock()
        if total <= 0:
            return
        if done < total and now - last_sent < PROGRESS_MIN_INTERVAL_S:
            return
        if done >= total and now - started < PROGRESS_MIN_INTERVAL_S:
            return
        last_sent = now
        fraction = min(1.0, done / total)
        asyncio.run_coroutine_threadsafe(_write(store, ids, fraction), loop)

    return report


async def _write(store: TaskStore, task_ids: Sequence[str], fraction: float) -> None:
    try:
        for task_id in task_ids:
            await store.set_progress(task_id, fraction)
    except Exception:  # progress is advisory; never fail a task over it
        logger.debug("progress write failed", exc_info=True)
