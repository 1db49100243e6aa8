"""Retention: finished workflows older than ``RETENTION_DAYS`` go, with their audio.

Off by default (0 keeps everything). When on, every round deletes the oldest
finished workflows past the cutoff, a batch at a time: their objects first,
then their cached records, then their rows (outputs, webhook deliveries,
idempotency keys). A step that fails leaves the rows, so the next round tries
the same workflows again; deleting an object or a key twice is no error. An
object the store refuses to delete (a permission, a lock) keeps its workflow,
tried again each round and logged, and the rest of the batch goes on. The
stats records stay, with each kind's counters (``app_stats_kinds``):
``/v1/stats`` keeps counting the work. A workflow whose webhook is still being
retried waits until that ends. Several App APIs may run it at once: they take
the same batch, and what one deletes the other finds gone.
"""

from __future__ import annotations

import logging
import time

from app_api import repository
from app_api.cache import WorkflowCache
from app_api.metrics import AppMetrics
from app_api.workflow import Clock
from core_base.constants import AUDIO_OBJECT_KEY
from core_base.contracts import TaskResult
from core_base.errors import NotDeletedError
from core_base.ports.database import Database
from core_base.ports.storage import ObjectStorage

logger = logging.getLogger(__name__)

# Workflows per batch, and batches per round at most: a backlog (retention just
# turned on) shrinks by this much a round without one round holding the loop long.
_BATCH = 500
_BATCHES_PER_ROUND = 20


class Retention:
    def __init__(
        self,
        db: Database,
        storage: ObjectStorage,
        cache: WorkflowCache,
        metrics: AppMetrics,
        *,
        retention_s: float,
        clock: Clock = time.time,
    ) -> None:
        self._db = db
        self._storage = storage
        self._cache = cache
        self._metrics = metrics
        self._retention_s = retention_s
        self._clock = clock
        # Deleted last round: their cached records are cleared once more (a result
        # read just before the rows went may have cached one just after).
        self._deleted_last_round: list[str] = []
        # Where the next round goes on from: the end of this round's last (full)
        # page, so that more workflows kept (their audio refused) than one round
        # pages through cannot hold back the rest for good; None: the oldest.
        self._resume_after: repository.Expired | None = None

    @property
    def enabled(self) -> bool:
        return self._retention_s > 0

    async def run_once(self) -> int:
        """Delete what has expired (a round's worth); returns how many workflows went."""
        if not self.enabled:
            return 0
        if self._deleted_last_round:
            await self._cache.forget(self._deleted_last_round)
            self._deleted_last_round = []
        cutoff = self._clock() - self._retention_s
        deleted = 0
        for _ in range(_BATCHES_PER_ROUND):
            page = await repository.expired_workflows(
                self._db, cutoff, _BATCH, after=self._resume_after
            )
            deleted += await self._delete([expired.task_id for expired in page]) if page else 0
            if len(page) < _BATCH:
                self._resume_after = None  # the end: the next round starts again
                break
            self._resume_after = page[-1]  # past those kept, to the next
        return deleted

    async def _delete(self, task_ids: list[str]) -> int:
        keys_by_task = await repository.object_keys(self._db, task_ids)
        keys = [key for task_keys in keys_by_task.values() for key in task_keys]
        # Objects before rows: rows left by a failed step bring the workflows back
        # next round, whereas objects whose rows were gone would never be found.
        try:
            await self._storage.delete_many(keys)
        except NotDeletedError as exc:
            refused = set(exc.keys)
            kept = {t for t, task_keys in keys_by_task.items() if refused.intersection(task_keys)}
            if not refused.issubset(keys):
                kept = set(task_ids)  # a refusal that names no workflow: keep them all
            # Warned each round: only someone changing the store's permissions or
            # locks ends it, and these workflows stay until then.
            logger.warning(
                "retention: keeping %d workflow(s) whose audio the store refused to delete: %s",
                len(kept),
                exc,
            )
            task_ids = [task_id for task_id in task_ids if task_id not in kept]
            keys = [key for key in keys if key not in refused]
        # Not best effort: a cached final record would answer /v1/result with links
        # to deleted audio for RESULT_TTL more. Before the rows (a cache that is
        # down leaves them for the next round), and after them, now and next round
        # (a result read meanwhile may have cached its record again from the rows
        # still there).
        await self._cache.forget(task_ids)
        deleted = await repository.delete_workflows(self._db, task_ids)
        self._deleted_last_round += task_ids
        await self._cache.forget(task_ids)
        self._metrics.workflows_deleted.inc(deleted)
        if not deleted:
            return 0
        logger.info(
            "retention: deleted %d workflow(s) finished over %g days ago, with %d audio file(s)",
            deleted,
            round(self._retention_s / 86400, 6),
            len(keys),
        )
        return deleted


async def drop_late_result(db: Database, storage: ObjectStorage, result: TaskResult) -> bool:
    """A worker's result for a workflow retention has deleted already (a
    generation a cancel did not stop, outliving RETENTION_DAYS): True, once the
    audio it uploaded after the deletion is deleted too (nothing else would ever
    find it). False when no such workflow finished here."""
    if not await repository.deleted_by_retention(db, result.task_id):
        return False
    output = result.output
    if output is None:
        return True
    expected = AUDIO_OBJECT_KEY.format(
        task_id=result.task_id, kind=result.kind.value, format=output.format.value
    )
    if output.key != expected:  # only ever the task's own object
        return True
    try:
        await storage.delete_many([output.key])
    except NotDeletedError as exc:
        logger.warning("retention: the store refused to delete late audio %s: %s", output.key, exc)
        return True
    logger.info(
        "retention: %s of %s came after its workflow was deleted: its audio %s went too",
        result.kind.value,
        result.task_id,
        output.key,
    )
    return True
