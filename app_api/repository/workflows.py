"""The ``app_workflows`` table: creating workflows (one, or many in one statement),
loading one with its outputs, finishing it, and the counts the overload check and
the metrics read.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from app_api.records import OutputRecord, WorkflowRecord
from app_api.repository._shared import ACTIVE, float_or_none
from core_base.contracts import AudioOutput
from core_base.domain import Kind, TaskStatus
from core_base.ports.database import Database, Row


async def insert_workflow(db: Database, record: WorkflowRecord, *, fanout_at: float) -> None:
    """The workflow and its outputs (two statements: run it in a transaction).
    ``fanout_at``: when a dispatcher may take the fan-out from the database; the
    creating process dispatches it from memory before then."""
    await db.execute(
        "INSERT INTO app_workflows (task_id, user_id, status, kinds, request, callback_url,"
        " created_at, updated_at) VALUES ($1, $2, $3, $4, $5, $6, $7, $8)",
        *_workflow_values(record),
    )
    values = ", ".join(
        f"($1, ${index + 4}, 'queued', $2, $3, $2)" for index in range(len(record.kinds))
    )
    await db.execute(
        "INSERT INTO app_workflow_outputs (task_id, kind, status, fanout_started_at,"
        f" next_fanout_at, updated_at) VALUES {values}",
        record.task_id,
        record.created_at,
        fanout_at,
        *(kind.value for kind in record.kinds),
    )


# PostgreSQL only: many new workflows with their outputs (and idempotency keys) in
# one statement: one round trip and one commit for a whole batch of calls. A row
# with a key is inserted only when its key is new (within the batch too: ON
# CONFLICT DO NOTHING skips a repeat of a key proposed earlier in the statement).
_PG_INSERT_WORKFLOWS = """
WITH input AS (
    SELECT * FROM unnest(
        $1::text[], $2::text[], $3::text[], $4::text[], $5::text[], $6::text[],
        $7::double precision[], $8::double precision[], $9::double precision[],
        $10::text[], $11::text[], $12::text[]
    ) AS t(task_id, user_id, status, kinds, request, callback_url,
           created_at, updated_at, fanout_at, caller, idempotency_key, body_hash)
),
key AS (
    INSERT INTO app_idempotency_keys (caller, idempotency_key, body_hash, task_id, created_at)
    SELECT caller, idempotency_key, body_hash, task_id, created_at
    FROM input WHERE idempotency_key IS NOT NULL
    ON CONFLICT (caller, idempotency_key) DO NOTHING
    RETURNING task_id
),
w AS (
    INSERT INTO app_workflows (task_id, user_id, status, kinds, request, callback_url,
                               created_at, updated_at)
    SELECT task_id, user_id, status, kinds, request, callback_url, created_at, updated_at
    FROM input
    WHERE idempotency_key IS NULL OR task_id IN (SELECT task_id FROM key)
    RETURNING task_id
),
outputs AS (
    INSERT INTO app_workflow_outputs (task_id, kind, status, fanout_started_at,
                                      next_fanout_at, updated_at)
    SELECT i.task_id, k.kind, 'queued', i.created_at, i.fanout_at, i.created_at
    FROM input i JOIN w ON w.task_id = i.task_id,
         json_array_elements_text(i.kinds::json) AS k(kind)
)
SELECT task_id FROM w
"""


@dataclass(frozen=True)
class NewWorkflow:
    """A workflow to insert; ``key`` = (caller, idempotency key, body hash)."""

    record: WorkflowRecord
    fanout_at: float
    key: tuple[str, str, str] | None = None


async def insert_workflows_pg(db: Database, new: Sequence[NewWorkflow]) -> set[str]:
    """PostgreSQL: :func:`insert_workflow` (and :func:`remember_idempotency_key` for
    those with a key) for all of ``new`` as one atomic statement. Returns the task
    ids inserted: one with a key already taken is not."""
    columns: list[list[Any]] = [[] for _ in range(12)]
    for item in new:
        keys = item.key or (None, None, None)
        for column, value in zip(
            columns, (*_workflow_values(item.record), item.fanout_at, *keys), strict=True
        ):
            column.append(value)
    rows = await db.fetch(_PG_INSERT_WORKFLOWS, *columns)
    return {str(row["task_id"]) for row in rows}


def _workflow_values(record: WorkflowRecord) -> tuple[Any, ...]:
    return (
        record.task_id,
        record.user_id,
        record.status.value,
        json.dumps([k.value for k in record.kinds]),
        json.dumps(record.request, sort_keys=True),
        record.callback_url,
        record.created_at,
        record.updated_at,
    )


# A workflow with its outputs in one round trip: a row per output, the workflow's
# columns on each (those both tables have, prefixed w_).
_LOAD_WORKFLOW = """
SELECT w.task_id, w.user_id, w.kinds, w.request, w.callback_url, w.status AS w_status,
    w.error AS w_error, w.created_at AS w_created_at, w.updated_at AS w_updated_at,
    w.completed_at AS w_completed_at, o.kind, o.status, o.progress, o.output, o.error,
    o.dispatched_at, o.completed_at, o.updated_at
FROM app_workflows w LEFT JOIN app_workflow_outputs o ON o.task_id = w.task_id
WHERE w.task_id = $1
"""


async def load_workflow(db: Database, task_id: str) -> WorkflowRecord | None:
    """The workflow and its outputs as one consistent read; None when unknown."""
    rows = await db.fetch(_LOAD_WORKFLOW, task_id)
    if not rows:
        return None
    first = rows[0]
    by_kind = {r["kind"]: output_record(r) for r in rows if r["kind"] is not None}
    kinds = [Kind(k) for k in json.loads(first["kinds"])]
    return WorkflowRecord(
        task_id=first["task_id"],
        user_id=first["user_id"],
        status=TaskStatus(first["w_status"]),
        kinds=kinds,
        request=json.loads(first["request"]),
        callback_url=first["callback_url"],
        error=first["w_error"],
        created_at=float(first["w_created_at"]),
        updated_at=float(first["w_updated_at"]),
        completed_at=float_or_none(first["w_completed_at"]),
        outputs=[by_kind[k.value] for k in kinds if k.value in by_kind],
    )


async def finish_workflow(
    db: Database, task_id: str, status: TaskStatus, error: str | None, now: float
) -> bool:
    """Make the workflow terminal; False when it already was."""
    changed = await db.execute(
        f"UPDATE app_workflows SET status = $2, error = $3, completed_at = $4, updated_at = $4"
        f" WHERE task_id = $1 AND status IN {ACTIVE}",
        task_id,
        status.value,
        error,
        now,
    )
    return changed == 1


async def count_active_workflows(db: Database) -> int:
    row = await db.fetchrow(f"SELECT COUNT(*) AS n FROM app_workflows WHERE status IN {ACTIVE}")
    return int(row["n"]) if row else 0


async def active_workflows_by_kind(db: Database) -> dict[Kind, int]:
    rows = await db.fetch(
        "SELECT o.kind AS kind, COUNT(*) AS n FROM app_workflow_outputs o"
        " JOIN app_workflows w ON w.task_id = o.task_id"
        f" WHERE w.status IN {ACTIVE} GROUP BY o.kind"
    )
    return {Kind(r["kind"]): int(r["n"]) for r in rows}


async def overdue_workflows(db: Database, created_before: float, limit: int) -> list[str]:
    rows = await db.fetch(
        f"SELECT task_id FROM app_workflows WHERE status IN {ACTIVE} AND created_at < $1"
        " ORDER BY created_at LIMIT $2",
        created_before,
        limit,
    )
    return [str(r["task_id"]) for r in rows]


def output_record(row: Row) -> OutputRecord:
    raw_output: Any = row["output"]
    return OutputRecord(
        kind=Kind(row["kind"]),
        status=TaskStatus(row["status"]),
        progress=float(row["progress"]),
        output=AudioOutput.model_validate_json(raw_output) if raw_output else None,
        error=row["error"],
        dispatched_at=float_or_none(row["dispatched_at"]),
        completed_at=float_or_none(row["completed_at"]),
        updated_at=float(row["updated_at"]),
    )
