"""The Redis cache of workflow records (Postgres is the source of truth).

A finished workflow never changes, so a cached terminal record is served as is;
a cached running one is only a hint and callers re-read Postgres. A cache that
is down, or slow, degrades to Postgres reads (see :class:`BestEffort`): it never
fails a request, nor holds one up for long.
"""

from __future__ import annotations

from collections.abc import Sequence

from pydantic import ValidationError

from app_api.best_effort import BestEffort
from app_api.records import WorkflowRecord
from core_base.ports.kv import KeyValueStore

# Under the deployment's key prefix (added by the adapter), beside the sub-services'
# "task:<service>:<id>" records.
WORKFLOW_KEY = "app:workflow:{task_id}"


class WorkflowCache:
    def __init__(self, kv: KeyValueStore, ttl_s: float, guard: BestEffort | None = None) -> None:
        self._kv = kv
        self._ttl_s = ttl_s
        self._guard = guard or BestEffort("workflow cache")

    async def get(self, task_id: str) -> WorkflowRecord | None:
        raw = await self._guard.run(
            "read", lambda: self._kv.get(WORKFLOW_KEY.format(task_id=task_id))
        )
        if raw is None:
            return None
        try:
            return WorkflowRecord.model_validate_json(raw)
        except ValidationError:
            return None

    async def put(self, record: WorkflowRecord) -> None:
        key, value = WORKFLOW_KEY.format(task_id=record.task_id), record.model_dump_json().encode()
        await self._guard.run("write", lambda: self._kv.set(key, value, ttl_s=self._ttl_s))

    async def put_many(self, records: Sequence[WorkflowRecord]) -> list[None]:
        """:meth:`put` for each, in one round trip (a :class:`Coalescer` flush)."""
        items = [
            (WORKFLOW_KEY.format(task_id=r.task_id), r.model_dump_json().encode()) for r in records
        ]
        await self._guard.run("write", lambda: self._kv.set_many(items, ttl_s=self._ttl_s))
        return [None] * len(records)

    async def forget(self, task_ids: Sequence[str]) -> None:
        """Delete these records, in one round trip. Not best effort: a record left
        behind would be served as is, so a cache that is down fails this
        (``UnavailableError``)."""
        await self._kv.delete_many([WORKFLOW_KEY.format(task_id=t) for t in task_ids])
