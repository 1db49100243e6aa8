"""Each kind's output of a workflow (``app_workflow_outputs``): running, finished, and
the finish of a kind that may finish its workflow, with the workflow's statistics
and webhook delivery written in the same transaction.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from app_api.records import OutputRecord, WorkflowRecord
from app_api.repository._shared import ACTIVE
from app_api.repository.deliveries import Delivery, insert_delivery
from app_api.repository.stats import audio_seconds_of, insert_stats, latency_s_of
from app_api.repository.workflows import finish_workflow
from core_base.contracts import AudioOutput
from core_base.domain import Kind, TaskStatus
from core_base.ports.database import Database

_MARK_OUTPUT_RUNNING = (
    "UPDATE app_workflow_outputs SET status = 'running',"
    " progress = CASE WHEN progress > $3 THEN progress ELSE $3 END,"
    " dispatched_at = COALESCE(dispatched_at, $4), next_fanout_at = NULL, updated_at = $4"
    f" WHERE task_id = $1 AND kind = $2 AND status IN {ACTIVE}"
)


_MARK_WORKFLOW_RUNNING = (
    "UPDATE app_workflows SET status = 'running' WHERE task_id = $1 AND status = 'queued'"
)


# mark_running on PostgreSQL: both updates in one statement (autocommitted); the
# kind's row is locked before the workflow's, as in finish_kind.
_PG_MARK_RUNNING = f"""
WITH kind AS ({_MARK_OUTPUT_RUNNING} RETURNING task_id),
running AS (
    UPDATE app_workflows SET status = 'running'
    WHERE task_id = $1 AND status = 'queued' AND EXISTS (SELECT 1 FROM kind)
)
SELECT EXISTS (SELECT 1 FROM kind) AS changed
"""


async def mark_running(db: Database, task_id: str, kind: Kind, progress: float, now: float) -> bool:
    """A kind is running (with its progress so far), and so is its workflow; False
    when the kind is not active (terminal, or no such workflow or kind). Both
    updates only ever move forward, never past a terminal status."""
    args = (task_id, kind.value, progress, now)
    if db.dialect == "postgresql":
        row = await db.fetchrow(_PG_MARK_RUNNING, *args)
        return bool(row and row["changed"])
    async with db.transaction() as tx:
        if await tx.execute(_MARK_OUTPUT_RUNNING, *args) != 1:
            return False
        await tx.execute(_MARK_WORKFLOW_RUNNING, task_id)
    return True


async def finish_output(
    db: Database,
    task_id: str,
    kind: Kind,
    status: TaskStatus,
    output: AudioOutput | None,
    error: str | None,
    now: float,
) -> bool:
    """Make one kind terminal; False when it already was (a repeated callback)."""
    changed = await db.execute(
        "UPDATE app_workflow_outputs SET status = $3, output = $4, error = $5,"
        " audio_seconds = $6, progress = 1, completed_at = $7, updated_at = $7,"
        " next_fanout_at = NULL"
        f" WHERE task_id = $1 AND kind = $2 AND status IN {ACTIVE}",
        task_id,
        kind.value,
        status.value,
        output.model_dump_json() if output is not None else None,
        error,
        output.duration if output is not None and status == TaskStatus.SUCCEEDED else 0.0,
        now,
    )
    return changed == 1


@dataclass(frozen=True)
class Finished:
    """What :func:`finish_kind` wrote."""

    kind: bool  # the kind became terminal (False: it already was)
    workflow: bool  # so did the workflow, with its stats record
    delivery: bool  # and its webhook delivery


def _outcome(status: str) -> str:
    """SQL: a kind's status as far as finishing a workflow goes (queued and running
    are alike: not finished)."""
    return f"CASE WHEN {status} IN {ACTIVE} THEN 'active' ELSE {status} END"


def _outcomes(statuses: Mapping[Kind, TaskStatus]) -> dict[Kind, TaskStatus | None]:
    """Python's :func:`_outcome`: the terminal statuses, None for an active kind."""
    return {kind: s if s.is_terminal else None for kind, s in statuses.items()}


# finish_kind on PostgreSQL: one autocommitted statement. It first locks the
# workflow's output rows (in kind order), which gives their latest committed
# statuses even when another statement changed them while this one waited; only
# if those are the statuses the caller read does it write, each data-modifying
# CTE chained to the rows the one before changed. Every statement that changes a
# kind locks its output row before the workflow's, so none can deadlock.
_PG_FINISH_KIND = f"""
WITH current AS (
    SELECT kind, status FROM app_workflow_outputs WHERE task_id = $1 ORDER BY kind FOR UPDATE
), seen AS (
    SELECT * FROM unnest($18::text[], $19::text[]) AS seen (kind, status)
), unchanged AS (
    SELECT NOT EXISTS (
        SELECT 1 FROM current FULL JOIN seen USING (kind)
        WHERE {_outcome("current.status")} IS DISTINCT FROM {_outcome("seen.status")}
    ) AS ok
), kind AS (
    UPDATE app_workflow_outputs SET status = $3, output = $4, error = $5, audio_seconds = $6,
        progress = 1, completed_at = $7, updated_at = $7, next_fanout_at = NULL
    WHERE task_id = $1 AND kind = $2 AND status IN {ACTIVE} AND (SELECT ok FROM unchanged)
    RETURNING task_id
), workflow AS (
    UPDATE app_workflows SET status = $8::text, error = $9, completed_at = $7, updated_at = $7
    WHERE task_id = $1 AND $8::text IS NOT NULL AND status IN {ACTIVE}
        AND EXISTS (SELECT 1 FROM kind)
    RETURNING task_id
), stats AS (
    INSERT INTO app_stats (task_id, user_id, status, audio_seconds, latency_s, created_at,
        completed_at)
    SELECT task_id, $10, $8::text, $11, $12, $13, $7 FROM workflow
    ON CONFLICT (task_id) DO NOTHING
), delivery AS (
    INSERT INTO app_webhook_deliveries (id, task_id, url, payload, status, attempts,
        next_attempt_at, created_at, updated_at)
    SELECT $14, task_id, $15::text, $16, 'pending', 0, $17, $7, $7 FROM workflow
    WHERE $15::text IS NOT NULL
    ON CONFLICT (task_id) DO NOTHING
    RETURNING id
)
SELECT (SELECT ok FROM unchanged) AS unchanged, EXISTS (SELECT 1 FROM kind) AS kind,
    EXISTS (SELECT 1 FROM workflow) AS workflow, EXISTS (SELECT 1 FROM delivery) AS delivery
"""


async def finish_kind(
    db: Database,
    record: WorkflowRecord,
    output: OutputRecord,
    *,
    seen: Mapping[Kind, TaskStatus],
    now: float,
    delivery: Delivery | None,
    delivery_due_at: float,
) -> Finished | None:
    """Write a kind's outcome, as ``output`` now holds it; when that made
    ``record.status`` terminal (the last kind), also the workflow's final status,
    its one stats record and its webhook ``delivery`` (due at ``delivery_due_at``).

    Optimistic: ``seen`` is every kind's status as the caller read them and worked
    the outcome out from. When any kind has finished since (another result came
    in meanwhile), nothing is written and None says to read again; so of two last
    results arriving together exactly one finishes the workflow. (A kind that
    only started meanwhile changes nothing here.)
    """
    status = output.status
    audio = output.output if status == TaskStatus.SUCCEEDED else None
    audio_json = audio.model_dump_json() if audio is not None else None
    audio_s = audio.duration if audio is not None else 0.0
    finishing = record.status.is_terminal
    if db.dialect == "postgresql":
        row = await db.fetchrow(
            _PG_FINISH_KIND,
            record.task_id,
            output.kind.value,
            status.value,
            audio_json,
            output.error,
            audio_s,
            now,
            record.status.value if finishing else None,
            record.error,
            record.user_id,
            audio_seconds_of(record),
            latency_s_of(record),
            record.created_at,
            delivery.id if delivery else None,
            delivery.url if delivery else None,
            delivery.payload if delivery else None,
            delivery_due_at,
            [kind.value for kind in seen],
            [seen_status.value for seen_status in seen.values()],
        )
        assert row is not None
        if not row["unchanged"]:
            return None
        return Finished(bool(row["kind"]), bool(row["workflow"]), bool(row["delivery"]))
    async with db.transaction() as tx:  # on SQLite, one writer at a time
        rows = await tx.fetch(
            "SELECT kind, status FROM app_workflow_outputs WHERE task_id = $1", record.task_id
        )
        current = {Kind(r["kind"]): TaskStatus(r["status"]) for r in rows}
        if _outcomes(current) != _outcomes(seen):
            return None
        if not await finish_output(
            tx, record.task_id, output.kind, status, audio, output.error, now
        ):
            return Finished(False, False, False)
        if not finishing or not await finish_workflow(
            tx, record.task_id, record.status, record.error, now
        ):
            return Finished(True, False, False)
        await insert_stats(tx, record)
        written = delivery is not None and await insert_delivery(
            tx,
            delivery.id,
            delivery.task_id,
            delivery.url,
            delivery.payload,
            now,
            next_attempt_at=delivery_due_at,
        )
    return Finished(True, True, written)


async def stale_outputs(db: Database, updated_before: float, limit: int) -> list[tuple[str, Kind]]:
    rows = await db.fetch(
        "SELECT task_id, kind FROM app_workflow_outputs"
        f" WHERE status IN {ACTIVE} AND dispatched_at IS NOT NULL AND updated_at < $1"
        " ORDER BY updated_at LIMIT $2",
        updated_before,
        limit,
    )
    return [(str(r["task_id"]), Kind(r["kind"])) for r in rows]


async def touch_output(db: Database, task_id: str, kind: Kind, progress: float, now: float) -> None:
    await db.execute(
        "UPDATE app_workflow_outputs SET updated_at = $4,"
        " progress = CASE WHEN progress > $3 THEN progress ELSE $3 END"
        f" WHERE task_id = $1 AND kind = $2 AND status IN {ACTIVE}",
        task_id,
        kind.value,
        progress,
        now,
    )
