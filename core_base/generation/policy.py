"""The worker's retry policy and seeds, written once.

A task that fails for a reason that may pass is requeued after a backoff; after
``MAX_TASK_ATTEMPTS`` deliveries, or at once for a ``PermanentError``, it fails.
"""

from __future__ import annotations

import hashlib

from core_base.constants import MAX_TASK_ATTEMPTS, RETRY_BACKOFF_BASE_S, RETRY_BACKOFF_CAP_S
from core_base.contracts import TaskMessage
from core_base.errors import PermanentError


def derive_seed(task_id: str) -> int:
    """The seed of a task sent without one: fixed per task, so a redelivered task
    produces the same audio."""
    return int.from_bytes(hashlib.sha256(task_id.encode()).digest()[:4], "big")


def seed_of(message: TaskMessage) -> int:
    """The seed actually used for a task."""
    return message.seed if message.seed is not None else derive_seed(message.task_id)


def retry_backoff_s(attempt: int) -> float:
    """Wait before the next attempt: base * 2**(attempt-1), capped."""
    return float(min(RETRY_BACKOFF_CAP_S, RETRY_BACKOFF_BASE_S * 2 ** (attempt - 1)))


# While the task store or the object store is down, a worker holding tasks tries
# again at most this long after its last try: back at work within seconds of the
# dependency's return (its /readyz says ready at once), where the task backoff's
# 30 s cap left it idle for up to that long.
DEPENDENCY_RETRY_CAP_S = 5.0


def dependency_retry_s(failures: int) -> float:
    """Wait before trying an unavailable dependency again: the task backoff,
    capped at DEPENDENCY_RETRY_CAP_S."""
    return min(DEPENDENCY_RETRY_CAP_S, retry_backoff_s(failures))


def gives_up(error: BaseException, attempt: int) -> bool:
    """True when a task that failed on ``attempt`` must not be tried again."""
    return isinstance(error, PermanentError) or attempt >= MAX_TASK_ATTEMPTS
