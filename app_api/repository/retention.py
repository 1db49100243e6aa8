"""Retention: finished workflows past their time, the audio objects they name, and
their deletion (their statistics are kept).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass

from app_api.repository._shared import ACTIVE, placeholders
from core_base.constants import AUDIO_OBJECT_KEY
from core_base.domain import AudioFormat
from core_base.ports.database import Database


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
        f" WHERE completed_at < $1 AND status NOT IN {ACTIVE}{page_after}"
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
    ids = placeholders(len(task_ids))
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
    ids = placeholders(len(task_ids))
    async with db.transaction() as tx:
        finished = [
            str(row["task_id"])
            for row in await tx.fetch(
                f"SELECT task_id FROM app_workflows WHERE task_id IN ({ids})"
                f" AND status NOT IN {ACTIVE}",
                *task_ids,
            )
        ]
        if not finished:
            return 0
        ids = placeholders(len(finished))
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


async def deleted_by_retention(db: Database, task_id: str) -> bool:
    """Whether this workflow finished and was deleted since: its stats record
    stays, its workflow row is gone."""
    row = await db.fetchrow(
        "SELECT 1 AS found FROM app_stats AS s WHERE s.task_id = $1"
        " AND NOT EXISTS (SELECT 1 FROM app_workflows AS w WHERE w.task_id = s.task_id)",
        task_id,
    )
    return row is not None
