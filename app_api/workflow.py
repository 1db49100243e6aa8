"""Workflows: create one per call, fold the sub-services' results into it, finish it.

A kind's result is folded in optimistically: the workflow is read (or taken as
this process created it, see :mod:`app_api.remembered`), the outcome worked out,
and written only if no kind finished in between (else read again), so of
concurrent callbacks for different kinds exactly one finishes the workflow.
Finishing writes, atomically, the final status, the one stats record and the one
pending webhook delivery: either all of them exist or none does.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass

from app_api import repository
from app_api.cache import WorkflowCache
from app_api.coalescer import Coalescer
from app_api.metrics import AppMetrics
from app_api.records import OutputRecord, WorkflowRecord, combined_error, overall_status
from app_api.remembered import RememberedWorkflows
from app_api.repository import Delivery
from core_base.contracts import TaskResult
from core_base.domain import Kind, TaskStatus
from core_base.errors import (
    ConflictError,
    InvalidInputError,
    NoAnswerInTimeError,
    NotFoundError,
    UnavailableError,
)
from core_base.ports.database import Database

logger = logging.getLogger(__name__)

Clock = Callable[[], float]

# New workflows written to PostgreSQL in one statement at most.
_MAX_INSERT_BATCH = 200
# Reads of a workflow to fold one result in: another is needed only when another
# kind finished between read and write, which happens at most once per kind.
_MAX_READS = 5


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


@dataclass(frozen=True)
class FinishedWorkflow:
    """A workflow this process finished, with the webhook delivery it wrote (None
    without a callback URL) and that webhook's body, rendered while the finish was
    being written (None when there is no delivery or no renderer)."""

    record: WorkflowRecord
    delivery: Delivery | None
    body: asyncio.Future[bytes] | None = None
    # Until when the delivery is leased to this process (its first attempt's).
    delivery_leased_until: float = 0.0


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
        on_finished: Callable[[FinishedWorkflow], None] = lambda _finished: None,
        on_unanswered: Callable[[WorkflowRecord, repository.Unanswered], None] = (
            lambda _record, _unanswered: None
        ),
        render_webhook: Callable[[WorkflowRecord], Awaitable[bytes]] | None = None,
        fanout_lease_s: float = 0.0,
        delivery_lease_s: float = 0.0,
        remembered: RememberedWorkflows | None = None,
        clock: Clock = time.time,
    ) -> None:
        """``on_finished`` gets each workflow this process finished, with the webhook
        delivery it wrote (None without a callback URL) and its body when
        ``render_webhook`` is given (rendered while the finish is written, which
        leaves the database round trip as the only wait): the row is written leased
        for ``delivery_lease_s`` so that this process makes the first attempt at
        once, from memory; likewise a new workflow's fan-out is leased to its
        creator for ``fanout_lease_s``. When a lease runs out (a crash), any
        dispatcher takes the row from the database. ``remembered`` holds the
        workflows this process created (a default-sized one when None).
        ``on_unanswered`` gets a workflow whose call is refused because PostgreSQL
        did not answer its insert in time: the insert may still land (see
        :func:`repository.settle_unanswered_pg`)."""
        self._db = db
        self._cache = cache
        self._metrics = metrics
        self._default_callback_url = default_callback_url
        self._on_finished = on_finished
        self._on_unanswered = on_unanswered
        self._render_webhook = render_webhook
        self._fanout_lease_s = fanout_lease_s
        self._delivery_lease_s = delivery_lease_s
        self._clock = clock
        self._remembered = remembered if remembered is not None else RememberedWorkflows()
        # A call waits at most about one statement timeout (10 s) for its insert.
        self._inserts = Coalescer(
            self._insert_batch, max_batch=_MAX_INSERT_BATCH, fails_waiting=(NoAnswerInTimeError,)
        )
        self._cache_writes = Coalescer(cache.put_many, max_batch=_MAX_INSERT_BATCH)

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

    def fanout_leased_until(self, record: WorkflowRecord) -> float:
        """Until when a new workflow's fan-out is leased to the process creating it."""
        return record.created_at + self._fanout_lease_s

    async def create(self, record: WorkflowRecord, claim: IdempotencyClaim | None) -> Created:
        """Persist a new workflow (atomically), or find the one an earlier call with
        the same idempotency key created. On PostgreSQL, concurrent calls share one
        statement and one commit (see :class:`Coalescer`)."""
        fanout_at = self.fanout_leased_until(record)
        if self._db.dialect == "postgresql":
            key = None if claim is None else (claim.caller, claim.key, claim.body_hash)
            new = repository.NewWorkflow(record, fanout_at, key)
            try:
                inserted = await self._inserts.submit(new)
            except UnavailableError as exc:
                # No answer in time, or the connection lost after the statement went:
                # it may have run, or may yet (refused before sending, it has none).
                if exc.server_process is not None:
                    unanswered = repository.Unanswered(
                        record.task_id, exc.server_process, fanout_at, keep=claim is not None
                    )
                    self._on_unanswered(record, unanswered)
                raise
        else:
            async with self._db.transaction() as tx:
                inserted = claim is None or await repository.remember_idempotency_key(
                    tx, claim.caller, claim.key, claim.body_hash, record.task_id, record.created_at
                )
                if inserted:
                    await repository.insert_workflow(tx, record, fanout_at=fanout_at)
        if not inserted:
            assert claim is not None
            # A concurrent or earlier request with the same key won the insert.
            existing = await self.replay(claim)
            if existing is None:
                raise UnavailableError("idempotency key is being recycled; retry")
            return Created(existing, created=False)
        # Only a finished record in the cache is ever trusted: writing the queued one
        # must not hold up the answer, and concurrent ones share a round trip.
        self._cache_writes.submit(record)
        self._remembered.add(record)
        return Created(record.task_id, created=True)

    async def _insert_batch(self, batch: Sequence[repository.NewWorkflow]) -> list[bool]:
        inserted = await repository.insert_workflows_pg(self._db, batch)
        return [new.record.task_id in inserted for new in batch]

    async def close(self) -> None:
        """Wait for the writes still in flight."""
        await self._inserts.close()
        await self._cache_writes.close()

    # --- results ----------------------------------------------------------------------------

    async def apply(self, result: TaskResult) -> bool:
        """Fold one sub-service result in; True when it changed anything.

        Repeated, late or out-of-order results change nothing: a kind moves
        queued -> running -> terminal only, and a terminal kind never changes.
        """
        if result.status == TaskStatus.SUCCEEDED and result.output is None:
            raise InvalidInputError("output", "required when status is succeeded")
        now = self._clock()
        if result.status == TaskStatus.RUNNING:
            return await self._mark_running(result, now)
        remembered = self._remembered.take(result.task_id) if result.status.is_terminal else None
        for _ in range(_MAX_READS):
            record: WorkflowRecord | None = remembered
            if record is None:
                record = await repository.load_workflow(self._db, result.task_id)
            remembered = None  # a second round reads what was written meanwhile
            if record is None:
                raise NotFoundError(f"no workflow {result.task_id}")
            output = record.output(result.kind)
            if output is None:
                raise NotFoundError(f"workflow {result.task_id} has no kind {result.kind.value}")
            if not result.status.is_terminal:
                return False  # "queued" tells nothing new
            outcome = await self._finish_kind(record, output, result, now)
            if outcome is not None:
                break
        else:
            raise UnavailableError(f"workflow {result.task_id} kept changing; retry")
        changed, finished = outcome
        if finished is not None:
            # The webhook goes first: a receiver reading the result at once is served
            # from Postgres until the cache holds the final record (a cached record
            # that is not final is never trusted), and from the cache afterwards.
            self._record_finished(finished)
            await self._cache.put(finished.record)
        return changed

    async def _mark_running(self, result: TaskResult, now: float) -> bool:
        """A kind started (or reports progress), in one statement (see
        :func:`repository.mark_running`); an unknown workflow or kind is a 404."""
        if await repository.mark_running(
            self._db, result.task_id, result.kind, result.progress, now
        ):
            return True
        record = await repository.load_workflow(self._db, result.task_id)
        if record is None:
            raise NotFoundError(f"no workflow {result.task_id}")
        if record.output(result.kind) is None:
            raise NotFoundError(f"workflow {result.task_id} has no kind {result.kind.value}")
        return False

    async def _finish_kind(
        self,
        record: WorkflowRecord,
        output: OutputRecord,
        result: TaskResult,
        now: float,
    ) -> tuple[bool, FinishedWorkflow | None] | None:
        """Make one kind terminal and, when it was the last, the workflow with its
        stats record and webhook delivery. Returns whether the kind changed, and
        the finished workflow with the delivery written for it, if any; None when
        a kind changed since ``record`` was read (read it again).

        The outcome is worked out here, on the record as read, and written only if
        every kind still has the status it had then (see
        :func:`repository.finish_kind`).
        """
        if output.status.is_terminal:
            return False, None  # a repeated or late result
        seen = {o.kind: o.status for o in record.outputs}
        succeeded = result.status == TaskStatus.SUCCEEDED
        output.status = result.status
        output.output = result.output if succeeded else None
        output.error = result.error or _default_error(result.status)
        output.progress, output.completed_at, output.updated_at = 1.0, now, now
        record.updated_at = now
        delivery = None
        status = overall_status(record.outputs)
        if status is not None:
            record.status, record.completed_at = status, now
            record.error = (
                None if status == TaskStatus.SUCCEEDED else combined_error(record.outputs)
            )
            delivery = self._new_delivery(record, now)
        body = None
        delivery_leased_until = now + self._delivery_lease_s
        if delivery is not None and self._render_webhook is not None:
            body = asyncio.ensure_future(self._render_webhook(record))
        try:
            written = await repository.finish_kind(
                self._db,
                record,
                output,
                seen=seen,
                now=now,
                delivery=delivery,
                delivery_due_at=delivery_leased_until,
            )
        except BaseException:
            discard_rendered(body)
            raise
        if written is None or not written.delivery:
            discard_rendered(body)
            body = None
        if written is None:
            return None
        if not written.workflow:
            return written.kind, None
        return True, FinishedWorkflow(
            record, delivery if written.delivery else None, body, delivery_leased_until
        )

    def _new_delivery(self, record: WorkflowRecord, now: float) -> Delivery | None:
        """The client webhook of a finished workflow; None without a callback URL.
        It is written leased to this process for ``delivery_lease_s``, which makes
        the first attempt at once, from memory."""
        url = record.callback_url or self._default_callback_url
        if not url:
            logger.info("workflow %s finished; no callback URL configured", record.task_id)
            return None
        return Delivery(
            id=new_webhook_id(),
            task_id=record.task_id,
            url=url,
            payload=record.model_dump_json(),
            status="pending",
            attempts=0,
            created_at=now,
        )

    async def fail_kind(self, task_id: str, kind: Kind, error: str) -> bool:
        """Fail one kind with an error the client will see (webhook and result)."""
        logger.warning("workflow %s: %s failed: %s", task_id, kind.value, error)
        return await self.apply(
            TaskResult(task_id=task_id, kind=kind, status=TaskStatus.FAILED, error=error)
        )

    async def cancel(self, task_id: str) -> WorkflowRecord:
        """Cancel every kind that has not ended (the client asked): the workflow
        ends ``canceled`` (``failed`` if a kind failed already) with its stats
        record and webhook, as any finish. Returns the workflow. Unknown: 404;
        nothing left to cancel: 409, unless the workflow is canceled already (a
        repeated cancel is answered as the first)."""
        record = await repository.load_workflow(self._db, task_id)
        if record is None:
            raise NotFoundError(f"no task {task_id}")
        canceled = []
        for output in record.outputs:
            if output.status.is_terminal:
                continue
            result = TaskResult(
                task_id=task_id,
                kind=output.kind,
                status=TaskStatus.CANCELED,
                error="canceled by the client",
            )
            if await self.apply(result):
                canceled.append(output.kind)
        final = await repository.load_workflow(self._db, task_id)
        if final is None:  # long finished, and deleted meanwhile (RETENTION_DAYS)
            raise NotFoundError(f"no task {task_id}")
        if not canceled and final.status != TaskStatus.CANCELED:
            raise ConflictError(f"task {task_id} has already {final.status.value}")
        if canceled:  # a repeated cancel changed nothing: nothing to log
            logger.info("workflow %s: canceled %s", task_id, ", ".join(k.value for k in canceled))
        return final

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

    def _record_finished(self, finished: FinishedWorkflow) -> None:
        record = finished.record
        self._metrics.workflows_finished.labels(record.status.value).inc()
        if record.completed_at is not None:
            self._metrics.workflow_latency.labels(record.status.value).observe(
                max(0.0, record.completed_at - record.created_at)
            )
        self._on_finished(finished)


def discard_rendered(body: asyncio.Future[bytes] | None) -> None:
    """Drop a rendered body that will not be sent (its outcome included)."""
    if body is None:
        return
    body.cancel()
    if body.done() and not body.cancelled():
        body.exception()  # retrieved: no "exception never retrieved" warning


def _default_error(status: TaskStatus) -> str | None:
    """A terminal kind's error when its sub-service gave none."""
    if status == TaskStatus.SUCCEEDED:
        return None
    return "canceled" if status == TaskStatus.CANCELED else "failed without a reason"
