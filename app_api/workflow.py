"""Workflows: create one per call, fold the sub-services' results into it, finish it.

Every change runs in one database transaction that first locks the workflow
row, so concurrent callbacks for different kinds serialise and exactly one of
them finishes the workflow. Finishing writes, in that same transaction, the
final status, the one stats record and the one pending webhook delivery:
either all of them exist or none does.
"""

from __future__ import annotations

import logging
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass

from app_api import repository
from app_api.cache import WorkflowCache
from app_api.metrics import AppMetrics
from app_api.records import WorkflowRecord, combined_error, overall_status
from core_base.contracts import TaskResult
from core_base.domain import Kind, TaskStatus
from core_base.errors import InvalidInputError, NotFoundError, UnavailableError
from core_base.ports.database import Database

logger = logging.getLogger(__name__)

Clock = Callable[[], float]


@dataclass(frozen=True)
class IdempotencyClaim:
    """An ``Idempotency-Key`` with the caller it belongs to and the body's hash."""

    caller: str
    key: str
    body_hash: str


@dataclass(frozen=True)
class Created:
    task_id: str
    created: bool  # False: an idempotent replay of an earlier call


def new_webhook_id() -> str:
    """A Standard Webhooks message id (stable across the delivery's retries)."""
    return f"msg_{uuid.uuid4().hex}"


class Workflows:
    """The workflow state machine over the repository, the cache and the metrics."""

    def __init__(
        self,
        db: Database,
        cache: WorkflowCache,
        metrics: AppMetrics,
        *,
        default_callback_url: str | None,
        on_finished: Callable[[], None] = lambda: None,
        clock: Clock = time.time,
    ) -> None:
        self._db = db
        self._cache = cache
        self._metrics = metrics
        self._default_callback_url = default_callback_url
        self._on_finished = on_finished
        self._clock = clock

    # --- creation ------------------------------------------------------------------------

    async def replay(self, claim: IdempotencyClaim) -> str | None:
        """The task created earlier under this key, or None; a reused key with a
        different body is refused (422 naming ``Idempotency-Key``)."""
        row = await repository.get_idempotency_key(self._db, claim.caller, claim.key)
        if row is None:
            return None
        if row["body_hash"] != claim.body_hash:
            raise InvalidInputError("Idempotency-Key", "already used for a different request body")
        return str(row["task_id"])

    async def create(self, record: WorkflowRecord, claim: IdempotencyClaim | None) -> Created:
        async with self._db.transaction() as tx:
            if claim is not None and not await repository.remember_idempotency_key(
                tx, claim.caller, claim.key, claim.body_hash, record.task_id, record.created_at
            ):
                # A concurrent request with the same key won the insert.
                existing = await self.replay(claim)
                if existing is None:
                    raise UnavailableError("idempotency key is being recycled; retry")
                return Created(existing, created=False)
            await repository.insert_workflow(tx, record)
        await self._cache.put(record)
        return Created(record.task_id, created=True)

    # --- results ----------------------------------------------------------------------------

    async def apply(self, result: TaskResult) -> bool:
        """Fold one sub-service result in; True when it changed anything.

        Repeated, late or out-of-order results change nothing: a kind moves
        queued -> running -> terminal only, and a terminal kind never changes.
        """
        if result.status == TaskStatus.SUCCEEDED and result.output is None:
            raise InvalidInputError("output", "required when status is succeeded")
        now = self._clock()
        finished: WorkflowRecord | None = None
        async with self._db.transaction() as tx:
            if not await repository.lock_workflow(tx, result.task_id, now):
                raise NotFoundError(f"no workflow {result.task_id}")
            record = await repository.load_workflow(tx, result.task_id)
            if record is None or record.output(result.kind) is None:
                raise NotFoundError(f"workflow {result.task_id} has no kind {result.kind.value}")
            if result.status.is_terminal:
                error = result.error or (
                    None if result.status == TaskStatus.SUCCEEDED else "failed without a reason"
                )
                changed = await repository.finish_output(
                    tx,
                    result.task_id,
                    result.kind,
                    result.status,
                    result.output if result.status == TaskStatus.SUCCEEDED else None,
                    error,
                    now,
                )
                if changed:
                    finished = await self._finish_if_done(tx, result.task_id, now)
            elif result.status == TaskStatus.RUNNING:
                changed = await repository.mark_output_running(
                    tx, result.task_id, result.kind, result.progress, now
                )
                if changed:
                    await repository.mark_workflow_running(tx, result.task_id)
            else:
                changed = False
        if changed:
            await self._refresh_cache(result.task_id)
        if finished is not None:
            self._record_finished(finished)
        return changed

    async def fail_kind(self, task_id: str, kind: Kind, error: str) -> bool:
        """Fail one kind with an error the client will see (webhook and result)."""
        logger.warning("workflow %s: %s failed: %s", task_id, kind.value, error)
        return await self.apply(
            TaskResult(task_id=task_id, kind=kind, status=TaskStatus.FAILED, error=error)
        )

    # --- reading ---------------------------------------------------------------------------------

    async def load(self, task_id: str) -> WorkflowRecord | None:
        """The workflow from the cache when finished there, else from Postgres."""
        cached = await self._cache.get(task_id)
        if cached is not None and cached.status.is_terminal:
            return cached
        record = await repository.load_workflow(self._db, task_id)
        if record is not None:
            await self._cache.put(record)
        return record

    # --- internals -----------------------------------------------------------------------------

    async def _finish_if_done(
        self, tx: Database, task_id: str, now: float
    ) -> WorkflowRecord | None:
        record = await repository.load_workflow(tx, task_id)
        if record is None:
            return None
        status = overall_status(record.outputs)
        if status is None:
            return None
        error = None if status == TaskStatus.SUCCEEDED else combined_error(record.outputs)
        if not await repository.finish_workflow(tx, task_id, status, error, now):
            return None
        record.status, record.error, record.completed_at = status, error, now
        await repository.insert_stats(tx, record)
        url = record.callback_url or self._default_callback_url
        if url:
            await repository.insert_delivery(
                tx, new_webhook_id(), task_id, url, record.model_dump_json(), now
            )
        else:
            logger.info("workflow %s finished; no callback URL configured", task_id)
        return record

    async def _refresh_cache(self, task_id: str) -> None:
        # Re-read after commit: the cache gets what Postgres holds, not what this
        # call believes; a stale running copy is never trusted by `load` anyway.
        record = await repository.load_workflow(self._db, task_id)
        if record is not None:
            await self._cache.put(record)

    def _record_finished(self, record: WorkflowRecord) -> None:
        self._metrics.workflows_finished.labels(record.status.value).inc()
        if record.completed_at is not None:
            self._metrics.workflow_latency.labels(record.status.value).observe(
                max(0.0, record.completed_at - record.created_at)
            )
        self._on_finished()
