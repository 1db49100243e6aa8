"""The fan-out's bookkeeping on each output: leases, dispatch, retries, calls whose
insert went unanswered, and the kinds to hand out again after an in-process
broker's restart.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from app_api.repository._shared import ACTIVE, update_matching
from core_base.domain import Kind, TaskStatus
from core_base.errors import ServerProcess
from core_base.ports.database import Database


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
    return await update_matching(
        db,
        "UPDATE app_workflow_outputs SET next_fanout_at = $1"
        " WHERE status = 'queued' AND dispatched_at IS NULL",
        ("task_id", "kind", "next_fanout_at"),
        [(task_id, kind.value, leased_until) for task_id, kind, leased_until in leases],
        now,
    )


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
        f" WHERE status IN {ACTIVE}",
        now,
    )
