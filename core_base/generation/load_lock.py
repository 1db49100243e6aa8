"""One model load at a time in a process.

transformers imports its classes lazily, on first use. Two threads importing
through it at once (in ``dev``, the AudioGen worker importing audiocraft while
the MusicGen worker loads through transformers) can meet a half-initialised
module and fail with "cannot import name 'RobertaTokenizer' from
'transformers'". A load is bound by disk and memory bandwidth anyway, so
running them one after the other costs little; a worker whose load waits says so
in its progress. The backends take the lock for their load; a worker holds it
over its load and warm-up (a first generation imports more of transformers), so
the lock is re-entrant.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager

from core_base.generation.models import LoadProgressCallback

_loading = threading.RLock()


@contextmanager
def one_load_at_a_time(report: LoadProgressCallback) -> Iterator[None]:
    """Hold the process's model-loading lock, reporting a wait for it."""
    if not _loading.acquire(blocking=False):
        report(0.0, "waiting for another model in this process to finish loading")
        _loading.acquire()
    try:
        yield
    finally:
        _loading.release()
