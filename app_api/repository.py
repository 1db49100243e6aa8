"""Every SQL statement of the App API, once, on the ``Database`` port.

Placeholders are ``$1, $2 ...``; the SQL is the subset PostgreSQL and SQLite
share. Functions take a ``Database`` that may be a transaction. Status
transitions are conditional updates (``WHERE status IN (...)``), so a repeated
or late message changes nothing, and the returned row count says whether this
call made the change.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from app_api.records import OutputRecord, WorkflowRecord
from core_base.constants import AUDIO_OBJECT_KEY
from core_base.contracts import AudioOutput
from core_base.domain import AudioFormat, Kind, TaskStatus
from core_base.errors import ServerProcess
from core_base.ports.database import Database, Row

_ACTIVE = "('queued', 'running')"
# Stand-ins for an open interval bound: epoch seconds far beyond any real date.
FOREVER_S = 1e13
# Rows matched per statement by _update_matching (a few parameters each).
_RELEASE_CHUNK = 100


# --- workflows --------------------------------------------------------------------------


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
    by_kind = {r["kind"]: _output_record(r) for r in rows if r["kind"] is not None}
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
        completed_at=_float_or_none(first["w_completed_at"]),
        outputs=[by_kind[k.value] for k in kinds if k.value in by_kind],
    )


async def finish_workflow(
    db: Database, task_id: str, status: TaskStatus, error: str | None, now: float
) -> bool:
    """Make the workflow terminal; False when it already was."""
    changed = await db.execute(
        f"UPDATE app_workflows SET status = $2, error = $3, completed_at = $4, updated_at = $4"
        f" WHERE task_id = $1 AND status IN {_ACTIVE}",
        task_id,
        status.value,
        error,
        now,
    )
    return changed == 1


async def count_active_workflows(db: Database) -> int:
    row = await db.fetchrow(f"SELECT COUNT(*) AS n FROM app_workflows WHERE status IN {_ACTIVE}")
    return int(row["n"]) if row else 0


async def active_workflows_by_kind(db: Database) -> dict[Kind, int]:
    rows = await db.fetch(
        "SELECT o.kind AS kind, COUNT(*) AS n FROM app_workflow_outputs o"
        " JOIN app_workflows w ON w.task_id = o.task_id"
        f" WHERE w.status IN {_ACTIVE} GROUP BY o.kind"
    )
    return {Kind(r["kind"]): int(r["n"]) for r in rows}


async def overdue_workflows(db: Database, created_before: float, limit: int) -> list[str]:
    rows = await db.fetch(
        f"SELECT task_id FROM app_workflows WHERE status IN {_ACTIVE} AND created_at < $1"
        " ORDER BY created_at LIMIT $2",
        created_before,
        limit,
    )
    return [str(r["task_id"]) for r in rows]


# --- outputs (one per kind) ---------------------------------------------------------------


_MARK_OUTPUT_RUNNING = (
    "UPDATE app_workflow_outputs SET status = 'running',"
    " progress = CASE WHEN progress > $3 THEN progress ELSE $3 END,"
    " dispatched_at = COALESCE(dispatched_at, $4), next_fanout_at = NULL, updated_at = $4"
    f" WHERE task_id = $1 AND kind = $2 AND status IN {_ACTIVE}"
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
        f" WHERE task_id = $1 AND kind = $2 AND status IN {_ACTIVE}",
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
    return f"CASE WHEN {status} IN {_ACTIVE} THEN 'active' ELSE {status} END"


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
    WHERE task_id = $1 AND kind = $2 AND status IN {_ACTIVE} AND (SELECT ok FROM unchanged)
    RETURNING task_id
), workflow AS (
    UPDATE app_workflows SET status = $8::text, error = $9, completed_at = $7, updated_at = $7
    WHERE task_id = $1 AND $8::text IS NOT NULL AND status IN {_ACTIVE}
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
            _audio_seconds(record),
            _latency_s(record),
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


@dataclass(frozen=True)
class FanoutJob:
    task_id: str
    kind: Kind
    attempts: int
    started_at: float


@dataclass(frozen=True)
class Unanswered:
    """A workflow whose creating insert went unanswered (its call was refused with
    a 503): the server process the insert went to, the fan-out lease it was written
    with, and ``keep`` when its call carried an ``Idempotency-Key`` (the retry finds
    it)."""

    task_id: str
    server: ServerProcess
    fanout_at: float
    keep: bool


async def settle_unanswered_pg(
    db: Database, workflows: Sequence[Unanswered], now: float
) -> list[str] | None:
    """PostgreSQL: the inserts that went unanswered may land after all. Those that
    did are deleted, unless kept: then their fan-out is due at once (it was written
    leased to the creator, who never handed it on). Returns the task ids deleted;
    None when nothing can be concluded yet, for a later round to try again.

    Nothing is concluded while a server process an insert went to is still there:
    its client gave up on it, but it may still be running the insert (blocked by a
    lock, its rows not visible yet) or about to (the request still on its way). It
    is terminated, which rolls back whatever it has not committed; once it is gone,
    what it wrote is all there is. A workflow whose fan-out someone has taken since
    (an App API whose poll found the lease run out: ``next_fanout_at`` changed), or
    that a sub-service accepted, is left alone: it is under way. The outputs are
    locked first, so that no dispatcher takes them meanwhile."""
    by_id = {workflow.task_id: workflow for workflow in workflows}
    servers = {workflow.server for workflow in workflows}
    async with db.transaction() as tx:
        # The very processes (pid and start): after a restart a pid names another.
        lingering = await tx.fetch(
            "SELECT a.pid, pg_terminate_backend(a.pid) AS ended FROM pg_stat_activity AS a"
            " JOIN unnest($1::int[], $2::timestamptz[]) AS s(pid, started_at)"
            " ON a.pid = s.pid AND a.backend_start = s.started_at"
            " WHERE a.pid <> pg_backend_pid()",
            [server.pid for server in servers],
            [server.started_at for server in servers],
        )
        if lingering:
            return None  # ended now (or ending): gone by a later round
        outputs = await tx.fetch(
            "SELECT task_id, status, dispatched_at, next_fanout_at FROM app_workflow_outputs"
            " WHERE task_id = ANY($1::text[]) FOR UPDATE",
            list(by_id),
        )
        under_way = {
            o["task_id"]
            for o in outputs
            if o["status"] != TaskStatus.QUEUED.value
            or o["dispatched_at"] is not None
            or o["next_fanout_at"] != by_id[o["task_id"]].fanout_at
        }
        written = {o["task_id"] for o in outputs} - under_way
        released = [task_id for task_id in written if by_id[task_id].keep]
        withdrawn = [task_id for task_id in written if not by_id[task_id].keep]
        if released:
            await tx.execute(
                "UPDATE app_workflow_outputs SET next_fanout_at = $2"
                " WHERE task_id = ANY($1::text[])",
                released,
                now,
            )
        if withdrawn:
            for table in ("app_workflow_outputs", "app_workflows"):
                await tx.execute(f"DELETE FROM {table} WHERE task_id = ANY($1::text[])", withdrawn)
    return withdrawn


async def due_fanouts(db: Database, now: float, limit: int) -> list[FanoutJob]:
    rows = await db.fetch(
        "SELECT task_id, kind, fanout_attempts, fanout_started_at FROM app_workflow_outputs"
        " WHERE status = 'queued' AND dispatched_at IS NULL AND next_fanout_at <= $1"
        " ORDER BY next_fanout_at LIMIT $2",
        now,
        limit,
    )
    return [
        FanoutJob(
            r["task_id"], Kind(r["kind"]), int(r["fanout_attempts"]), float(r["fanout_started_at"])
        )
        for r in rows
    ]


async def claim_fanout(db: Database, job: FanoutJob, now: float, lease_until: float) -> bool:
    """Take a due fan-out for ``lease_until``; False when another dispatcher has it."""
    changed = await db.execute(
        "UPDATE app_workflow_outputs SET next_fanout_at = $4"
        " WHERE task_id = $1 AND kind = $2 AND status = 'queued' AND dispatched_at IS NULL"
        " AND next_fanout_at <= $3",
        job.task_id,
        job.kind.value,
        now,
        lease_until,
    )
    return changed == 1


async def release_fanouts(
    db: Database, leases: Sequence[tuple[str, Kind, float]], now: float
) -> int:
    """Hand leased fan-outs, given as (task id, kind, leased until), back to any
    dispatcher (due at ``now``): those not sent, under that very lease, none
    another dispatcher took since. Returns how many."""
    return await _update_matching(
        db,
        "UPDATE app_workflow_outputs SET next_fanout_at = $1"
        " WHERE status = 'queued' AND dispatched_at IS NULL",
        ("task_id", "kind", "next_fanout_at"),
        [(task_id, kind.value, leased_until) for task_id, kind, leased_until in leases],
        now,
    )


async def _update_matching(
    db: Database,
    update: str,
    columns: Sequence[str],
    rows: Sequence[Sequence[Any]],
    *args: Any,
) -> int:
    """``update`` (its WHERE clause last, ``args`` its parameters) on the rows whose
    ``columns`` equal one of ``rows``, a chunk per statement; returns rows changed."""
    changed = 0
    for start in range(0, len(rows), _RELEASE_CHUNK):
        chunk = rows[start : start + _RELEASE_CHUNK]
        first = len(args) + 1
        matches = " OR ".join(
            "("
            + " AND ".join(
                f"{column} = ${first + len(columns) * index + offset}"
                for offset, column in enumerate(columns)
            )
            + ")"
            for index in range(len(chunk))
        )
        changed += await db.execute(
            f"{update} AND ({matches})", *args, *(value for row in chunk for value in row)
        )
    return changed


async def mark_dispatched(db: Database, task_id: str, kind: Kind, now: float) -> None:
    await db.execute(
        "UPDATE app_workflow_outputs SET dispatched_at = COALESCE(dispatched_at, $3),"
        " next_fanout_at = NULL, fanout_attempts = fanout_attempts + 1, updated_at = $3,"
        " error = CASE WHEN status = 'queued' THEN NULL ELSE error END"
        " WHERE task_id = $1 AND kind = $2",
        task_id,
        kind.value,
        now,
    )


# mark_dispatched_many on PostgreSQL: the pairs as two arrays, joined. One statement
# text for any number of pairs, planned once; the OR of pairs that SQLite gets took
# PostgreSQL 6.7 ms for 100 pairs (0.5 ms for one), most of it planning. A pair
# given twice updates its row once, as with the OR.
_PG_MARK_DISPATCHED = """
UPDATE app_workflow_outputs AS o SET dispatched_at = COALESCE(o.dispatched_at, $1),
    next_fanout_at = NULL, fanout_attempts = o.fanout_attempts + 1, updated_at = $1,
    error = CASE WHEN o.status = 'queued' THEN NULL ELSE o.error END
FROM unnest($2::text[], $3::text[]) AS j (task_id, kind)
WHERE o.task_id = j.task_id AND o.kind = j.kind
"""


async def mark_dispatched_many(db: Database, jobs: list[tuple[str, Kind]], now: float) -> None:
    """:func:`mark_dispatched` for several (task, kind) pairs in one statement."""
    if not jobs:
        return
    if db.dialect == "postgresql":
        await db.execute(
            _PG_MARK_DISPATCHED,
            now,
            [task_id for task_id, _ in jobs],
            [kind.value for _, kind in jobs],
        )
        return
    matches = " OR ".join(
        f"(task_id = ${2 * i + 2} AND kind = ${2 * i + 3})" for i in range(len(jobs))
    )
    await db.execute(
        "UPDATE app_workflow_outputs SET dispatched_at = COALESCE(dispatched_at, $1),"
        " next_fanout_at = NULL, fanout_attempts = fanout_attempts + 1, updated_at = $1,"
        " error = CASE WHEN status = 'queued' THEN NULL ELSE error END"
        f" WHERE {matches}",
        now,
        *(value for task_id, kind in jobs for value in (task_id, kind.value)),
    )


async def schedule_fanout_retry(
    db: Database, task_id: str, kind: Kind, next_at: float, error: str, now: float
) -> None:
    await db.execute(
        "UPDATE app_workflow_outputs SET fanout_attempts = fanout_attempts + 1,"
        " next_fanout_at = $3, error = $4, updated_at = $5"
        " WHERE task_id = $1 AND kind = $2 AND status = 'queued' AND dispatched_at IS NULL",
        task_id,
        kind.value,
        next_at,
        error,
        now,
    )


async def hasten_fanout_retries(db: Database, kind: Kind, now: float, max_wait_s: float) -> int:
    """Make the fan-outs of ``kind`` that wait out a backoff due now; how many.

    A backoff was set with the row's ``updated_at`` and is at most ``max_wait_s``
    (the backoff cap) long; a claim (another dispatcher submitting the task now)
    moves ``next_fanout_at`` a lease, longer than any backoff, past a later time
    and leaves ``updated_at``: such rows are left alone, so that no task is
    submitted twice at once (the sub-service could queue it twice)."""
    return await db.execute(
        "UPDATE app_workflow_outputs SET next_fanout_at = $2"
        " WHERE kind = $1 AND status = 'queued' AND dispatched_at IS NULL"
        " AND fanout_attempts > 0 AND next_fanout_at > $2"
        " AND next_fanout_at - updated_at <= $3",
        kind.value,
        now,
        max_wait_s,
    )


async def reset_dispatch(db: Database, task_id: str, kind: Kind, now: float) -> bool:
    """The sub-service has no record of a task that never reported running: fan it
    out again. False when the kind is no longer ``queued`` (a kind seen running is
    never sent back to ``queued``)."""
    changed = await db.execute(
        "UPDATE app_workflow_outputs SET dispatched_at = NULL,"
        " fanout_attempts = 0, fanout_started_at = $3, next_fanout_at = $3, updated_at = $3"
        " WHERE task_id = $1 AND kind = $2 AND status = 'queued'",
        task_id,
        kind.value,
        now,
    )
    return changed > 0


async def requeue_unfinished(db: Database, now: float) -> int:
    """Every kind not finished yet, queued again to be fanned out at once; returns
    how many. Only for a start on an in-process broker and task store (``dev``),
    which kept nothing of the tasks handed over before: nothing will call back for
    them, and a sub-service will run them as new. (On RabbitMQ a running task's
    message is redelivered instead; see :mod:`app_api.reconcile`.) The workflows
    keep their status; the kinds' progress starts again."""
    return await db.execute(
        "UPDATE app_workflow_outputs SET status = 'queued', progress = 0, dispatched_at = NULL,"
        " fanout_attempts = 0, fanout_started_at = $1, next_fanout_at = $1, updated_at = $1"
        f" WHERE status IN {_ACTIVE}",
        now,
    )


async def stale_outputs(db: Database, updated_before: float, limit: int) -> list[tuple[str, Kind]]:
    rows = await db.fetch(
        "SELECT task_id, kind FROM app_workflow_outputs"
        f" WHERE status IN {_ACTIVE} AND dispatched_at IS NOT NULL AND updated_at < $1"
        " ORDER BY updated_at LIMIT $2",
        updated_before,
        limit,
    )
    return [(str(r["task_id"]), Kind(r["kind"])) for r in rows]


async def touch_output(db: Database, task_id: str, kind: Kind, progress: float, now: float) -> None:
    await db.execute(
        "UPDATE app_workflow_outputs SET updated_at = $4,"
        " progress = CASE WHEN progress > $3 THEN progress ELSE $3 END"
        f" WHERE task_id = $1 AND kind = $2 AND status IN {_ACTIVE}",
        task_id,
        kind.value,
        progress,
        now,
    )


# --- stats -------------------------------------------------------------------------------------


async def insert_stats(db: Database, record: WorkflowRecord) -> bool:
    """The one statistics record of a finished workflow; False when it exists."""
    assert record.completed_at is not None
    changed = await db.execute(
        "INSERT INTO app_stats (task_id, user_id, status, audio_seconds, latency_s,"
        " created_at, completed_at) VALUES ($1, $2, $3, $4, $5, $6, $7)"
        " ON CONFLICT (task_id) DO NOTHING",
        record.task_id,
        record.user_id,
        record.status.value,
        _audio_seconds(record),
        _latency_s(record),
        record.created_at,
        record.completed_at,
    )
    return changed == 1


def _outcomes(statuses: Mapping[Kind, TaskStatus]) -> dict[Kind, TaskStatus | None]:
    """Python's :func:`_outcome`: the terminal statuses, None for an active kind."""
    return {kind: s if s.is_terminal else None for kind, s in statuses.items()}


def _audio_seconds(record: WorkflowRecord) -> float:
    """Audio delivered by a workflow: its succeeded outputs' durations."""
    return float(
        sum(
            o.output.duration
            for o in record.outputs
            if o.output is not None and o.status == TaskStatus.SUCCEEDED
        )
    )


def _latency_s(record: WorkflowRecord) -> float:
    """From the call to the workflow's end (0 while it runs)."""
    if record.completed_at is None:
        return 0.0
    return max(0.0, record.completed_at - record.created_at)


# The average latency is the service's: of what succeeded or failed. A cancel comes
# when the client chooses, so its time says nothing about how long work takes.
_COUNTERS = (
    "COUNT(*) AS total,"
    " COALESCE(SUM(CASE WHEN {s} = 'succeeded' THEN 1 ELSE 0 END), 0) AS succeeded,"
    " COALESCE(SUM(CASE WHEN {s} = 'failed' THEN 1 ELSE 0 END), 0) AS failed,"
    " COALESCE(SUM(CASE WHEN {s} = 'canceled' THEN 1 ELSE 0 END), 0) AS canceled,"
    " COALESCE(SUM({a}), 0) AS audio_seconds,"
    " AVG(CASE WHEN {s} <> 'canceled' THEN {lat} END) AS avg_latency_s"
)


async def user_stats(db: Database, user_id: str, since: float, until: float) -> Row:
    counters = _COUNTERS.format(s="status", a="audio_seconds", lat="latency_s")
    row = await db.fetchrow(
        f"SELECT {counters} FROM app_stats"
        " WHERE user_id = $1 AND created_at >= $2 AND created_at < $3",
        user_id,
        since,
        until,
    )
    return row or {}


# Each finished kind of a user's workflows in a time range: from its output row,
# or, once retention deleted that, from the counters it left in app_stats_kinds.
_KINDS_OF_USER = """
SELECT o.kind AS kind, o.status AS status, o.audio_seconds AS audio_seconds,
    o.completed_at - s.created_at AS latency_s
FROM app_stats AS s JOIN app_workflow_outputs AS o ON o.task_id = s.task_id
WHERE s.user_id = $1 AND s.created_at >= $2 AND s.created_at < $3
UNION ALL
SELECT k.kind, k.status, k.audio_seconds, k.latency_s
FROM app_stats AS s JOIN app_stats_kinds AS k ON k.task_id = s.task_id
WHERE s.user_id = $1 AND s.created_at >= $2 AND s.created_at < $3
"""


async def user_stats_by_kind(db: Database, user_id: str, since: float, until: float) -> list[Row]:
    counters = _COUNTERS.format(s="status", a="audio_seconds", lat="latency_s")
    return await db.fetch(
        f"SELECT kind, {counters} FROM ({_KINDS_OF_USER}) AS kinds GROUP BY kind",
        user_id,
        since,
        until,
    )


# --- webhook deliveries ------------------------------------------------------------------------


@dataclass(frozen=True)
class Delivery:
    id: str
    task_id: str
    url: str
    payload: str
    status: str
    attempts: int
    created_at: float


async def insert_delivery(
    db: Database,
    delivery_id: str,
    task_id: str,
    url: str,
    payload: str,
    now: float,
    *,
    next_attempt_at: float | None = None,
) -> bool:
    """A pending delivery, due at ``next_attempt_at`` (default: now); a later time
    leaves the first attempt to the process that wrote it (a lease, as a claim)."""
    changed = await db.execute(
        "INSERT INTO app_webhook_deliveries (id, task_id, url, payload, status, attempts,"
        " next_attempt_at, created_at, updated_at) VALUES ($1, $2, $3, $4, 'pending', 0, $6, $5, $5)"
        " ON CONFLICT (task_id) DO NOTHING",
        delivery_id,
        task_id,
        url,
        payload,
        now,
        now if next_attempt_at is None else next_attempt_at,
    )
    return changed == 1


async def due_deliveries(db: Database, now: float, limit: int) -> list[tuple[str, str]]:
    """(id, url) of the deliveries due, the longest due first."""
    rows = await db.fetch(
        "SELECT id, url FROM app_webhook_deliveries"
        " WHERE status = 'pending' AND next_attempt_at <= $1"
        " ORDER BY next_attempt_at LIMIT $2",
        now,
        limit,
    )
    return [(str(r["id"]), str(r["url"])) for r in rows]


async def postpone_deliveries(
    db: Database, delivery_ids: Sequence[str], now: float, until: float
) -> None:
    """Make due deliveries due again at ``until`` (unless another dispatcher took
    them meanwhile), in one statement."""
    if not delivery_ids:
        return
    ids = ", ".join(f"${index + 3}" for index in range(len(delivery_ids)))
    await db.execute(
        "UPDATE app_webhook_deliveries SET next_attempt_at = $2"
        f" WHERE status = 'pending' AND next_attempt_at <= $1 AND id IN ({ids})",
        now,
        until,
        *delivery_ids,
    )


async def claim_delivery(db: Database, delivery_id: str, now: float, lease_until: float) -> bool:
    """Take a due delivery until ``lease_until``; False when another dispatcher has it.
    A crashed dispatcher's lease simply runs out and the delivery is due again."""
    changed = await db.execute(
        "UPDATE app_webhook_deliveries SET next_attempt_at = $3"
        " WHERE id = $1 AND status = 'pending' AND next_attempt_at <= $2",
        delivery_id,
        now,
        lease_until,
    )
    return changed == 1


async def release_deliveries(db: Database, leases: Sequence[tuple[str, float]], now: float) -> int:
    """Hand leased deliveries, given as (id, leased until), back to any dispatcher
    (due at ``now``): those still pending under that very lease, none another
    dispatcher took since. Returns how many."""
    return await _update_matching(
        db,
        "UPDATE app_webhook_deliveries SET next_attempt_at = $1 WHERE status = 'pending'",
        ("id", "next_attempt_at"),
        leases,
        now,
    )


async def get_delivery(db: Database, delivery_id: str) -> Delivery | None:
    row = await db.fetchrow("SELECT * FROM app_webhook_deliveries WHERE id = $1", delivery_id)
    return None if row is None else _delivery(row)


async def record_delivery_attempt(
    db: Database,
    delivery_id: str,
    *,
    attempt: int,
    status: str,
    next_attempt_at: float,
    error: str | None,
    status_code: int | None,
    now: float,
) -> None:
    """Record the outcome of attempt number ``attempt`` (1 for the first). Only
    over the attempt before it: repeating the write (its answer was lost) changes
    nothing, nor does a late one after another dispatcher's attempt; except a
    delivery, which ends the retries whatever was recorded meanwhile."""
    await db.execute(
        "UPDATE app_webhook_deliveries SET status = $2,"
        " attempts = CASE WHEN attempts > $7 THEN attempts ELSE $7 END,"
        " next_attempt_at = $3, last_error = $4, last_status_code = $5, updated_at = $6,"
        " delivered_at = CASE WHEN $2 = 'delivered' THEN $6 ELSE delivered_at END"
        " WHERE id = $1 AND status = 'pending' AND (attempts = $7 - 1 OR $2 = 'delivered')",
        delivery_id,
        status,
        next_attempt_at,
        error,
        status_code,
        now,
        attempt,
    )


# --- idempotency keys ------------------------------------------------------------------------------


async def remember_idempotency_key(
    db: Database, caller: str, key: str, body_hash: str, task_id: str, now: float
) -> bool:
    """True when this call registered the key; False when it was already there."""
    changed = await db.execute(
        "INSERT INTO app_idempotency_keys (caller, idempotency_key, body_hash, task_id, created_at)"
        " VALUES ($1, $2, $3, $4, $5) ON CONFLICT (caller, idempotency_key) DO NOTHING",
        caller,
        key,
        body_hash,
        task_id,
        now,
    )
    return changed == 1


async def get_idempotency_key(db: Database, caller: str, key: str) -> Row | None:
    return await db.fetchrow(
        "SELECT body_hash, task_id FROM app_idempotency_keys"
        " WHERE caller = $1 AND idempotency_key = $2",
        caller,
        key,
    )


async def forget_idempotency_keys(db: Database, created_before: float) -> int:
    return await db.execute(
        "DELETE FROM app_idempotency_keys WHERE created_at < $1", created_before
    )


# --- retention -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Expired:
    task_id: str
    completed_at: float


async def expired_workflows(
    db: Database, completed_before: float, limit: int, after: Expired | None = None
) -> list[Expired]:
    """Up to ``limit`` workflows that finished before ``completed_before``, oldest
    first (by completion, then id), and after ``after`` when given: the last of
    the page before, so that paging goes past workflows that stay (their audio
    refused). Not one whose webhook is still being retried (it would name a
    result that is gone)."""
    page_after = " AND (completed_at, task_id) > ($3, $4)" if after is not None else ""
    rows = await db.fetch(
        "SELECT task_id, completed_at FROM app_workflows AS w"
        f" WHERE completed_at < $1 AND status NOT IN {_ACTIVE}{page_after}"
        " AND NOT EXISTS (SELECT 1 FROM app_webhook_deliveries AS d"
        " WHERE d.task_id = w.task_id AND d.status = 'pending')"
        " ORDER BY completed_at, task_id LIMIT $2",
        completed_before,
        limit,
        *((after.completed_at, after.task_id) if after is not None else ()),
    )
    return [Expired(str(row["task_id"]), float(row["completed_at"])) for row in rows]


async def object_keys(db: Database, task_ids: Sequence[str]) -> dict[str, list[str]]:
    """Where each of these workflows' audio may lie in the object store (sorted):
    each kind's key in the format asked for (a worker that finished after its kind
    was canceled or failed uploaded it all the same, unrecorded), and any key an
    output names."""
    if not task_ids:
        return {}
    ids = _placeholders(len(task_ids))
    keys: dict[str, set[str]] = {}
    for row in await db.fetch(
        f"SELECT task_id, kinds, request FROM app_workflows WHERE task_id IN ({ids})", *task_ids
    ):
        audio_format = json.loads(row["request"]).get("format", AudioFormat.WAV.value)
        keys[row["task_id"]] = {
            AUDIO_OBJECT_KEY.format(task_id=row["task_id"], kind=kind, format=audio_format)
            for kind in json.loads(row["kinds"])
        }
    for row in await db.fetch(
        f"SELECT task_id, output FROM app_workflow_outputs"
        f" WHERE task_id IN ({ids}) AND output IS NOT NULL",
        *task_ids,
    ):
        # The key alone, not the whole output validated: an output an older version
        # stored with a value now refused must not stop every retention round.
        keys.setdefault(row["task_id"], set()).add(str(json.loads(row["output"])["key"]))
    return {task_id: sorted(task_keys) for task_id, task_keys in keys.items()}


async def delete_workflows(db: Database, task_ids: Sequence[str]) -> int:
    """Delete these finished workflows with their outputs, webhook deliveries and
    idempotency keys, in one transaction; their stats records stay, and their
    outputs' counters move to ``app_stats_kinds`` (``/v1/stats`` counts them all).
    Returns how many workflows went; one still active never does."""
    if not task_ids:
        return 0
    ids = _placeholders(len(task_ids))
    async with db.transaction() as tx:
        finished = [
            str(row["task_id"])
            for row in await tx.fetch(
                f"SELECT task_id FROM app_workflows WHERE task_id IN ({ids})"
                f" AND status NOT IN {_ACTIVE}",
                *task_ids,
            )
        ]
        if not finished:
            return 0
        ids = _placeholders(len(finished))
        # /v1/stats counts each kind from its output row; the rows go, their counters stay.
        await tx.execute(
            "INSERT INTO app_stats_kinds (task_id, kind, status, audio_seconds, latency_s)"
            " SELECT o.task_id, o.kind, o.status, o.audio_seconds, o.completed_at - s.created_at"
            " FROM app_workflow_outputs AS o JOIN app_stats AS s ON s.task_id = o.task_id"
            f" WHERE o.task_id IN ({ids}) ON CONFLICT (task_id, kind) DO NOTHING",
            *finished,
        )
        for table in ("app_webhook_deliveries", "app_idempotency_keys", "app_workflow_outputs"):
            await tx.execute(f"DELETE FROM {table} WHERE task_id IN ({ids})", *finished)
        return await tx.execute(f"DELETE FROM app_workflows WHERE task_id IN ({ids})", *finished)


def _placeholders(count: int) -> str:
    """``$1, $2, ... $count``."""
    return ", ".join(f"${index}" for index in range(1, count + 1))


# --- row mapping ------------------------------------------------------------------------------------


def _output_record(row: Row) -> OutputRecord:
    raw_output: Any = row["output"]
    return OutputRecord(
        kind=Kind(row["kind"]),
        status=TaskStatus(row["status"]),
        progress=float(row["progress"]),
        output=AudioOutput.model_validate_json(raw_output) if raw_output else None,
        error=row["error"],
        dispatched_at=_float_or_none(row["dispatched_at"]),
        completed_at=_float_or_none(row["completed_at"]),
        updated_at=float(row["updated_at"]),
    )


def _delivery(row: Row) -> Delivery:
    return Delivery(
        id=str(row["id"]),
        task_id=str(row["task_id"]),
        url=str(row["url"]),
        payload=str(row["payload"]),
        status=str(row["status"]),
        attempts=int(row["attempts"]),
        created_at=float(row["created_at"]),
    )


def _float_or_none(value: Any) -> float | None:
    return None if value is None else float(value)
