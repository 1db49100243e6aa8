"""One model load at a time in a process.

transformers imports its classes lazily, on first use. Two threads importing
through it at once (in ``dev``, the AudioGen worker importing audiocraft while
the MusicGen worker loads through transformers) can meet a half-initialised
module and fail with "cannot import name 'RobertaTokenizer' from
'transformers'". So loads take turns: a process that runs several workers
(``dev``) starts in the sum of their load times rather than the longest, which
only ``dev`` pays (production runs one worker per process). A worker whose load
waits says so in its progress, and gives up waiting when it is told to stop.

The backends take the lock for their load; a worker holds it over its load and
warm-up (a model's first generation is the other place libraries import lazily),
so the lock is re-entrant.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager

from core_base.generation.models import LoadProgressCallback

_loading = threading.RLock()
_ABANDON_POLL_S = 0.2


class LoadAbandoned(Exception):
    """A load given up before it started: its worker is stopping."""


def _never() -> bool:
    return False


@contextmanager
def one_load_at_a_time(
    report: LoadProgressCallback, abandoned: Callable[[], bool] = _never
) -> Iterator[None]:
    """Hold the process's model-loading lock, reporting a wait for it; raise
    LoadAbandoned if ``abandoned()`` turns true while waiting."""
    if not _loading.acquire(blocking=False):
        report(0.0, "waiting for another model in this process to finish loading")
        while not _loading.acquire(timeout=_ABANDON_POLL_S):
            if abandoned():
                raise LoadAbandoned("stopped while waiting for another model's load")
    try:
        if abandoned():  # the stop came while the lock was being handed over
            raise LoadAbandoned("stopped while waiting for another model's load")
        yield
    finally:
        _loading.release()
