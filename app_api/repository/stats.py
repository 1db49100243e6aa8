"""Per-user statistics (``app_stats``): one record per finished workflow, and the
counters read back by user and by kind.
"""

from __future__ import annotations

from app_api.records import WorkflowRecord
from core_base.domain import TaskStatus
from core_base.ports.database import Database, Row


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
        audio_seconds_of(record),
        latency_s_of(record),
        record.created_at,
        record.completed_at,
    )
    return changed == 1


def audio_seconds_of(record: WorkflowRecord) -> float:
    """Audio delivered by a workflow: its succeeded outputs' durations."""
    return float(
        sum(
            o.output.duration
            for o in record.outputs
            if o.output is not None and o.status == TaskStatus.SUCCEEDED
        )
    )


def latency_s_of(record: WorkflowRecord) -> float:
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
