"""The Redis cache of workflow records (Postgres is the source of truth).

A finished workflow never changes, so a cached terminal record is served as is;
a cached running one is only a hint and callers re-read Postgres. A cache that
is down degrades to Postgres reads: it never fails a request.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

from pydantic import ValidationError

from app_api.records import WorkflowRecord
from core_base.ports.kv import KeyValueStore

logger = logging.getLogger(__name__)

# Under the deployment's key prefix (added by the adapter), beside the sub-services'
# "task:<service>:<id>" records.
WORKFLOW_KEY = "app:workflow:{task_id}"


class WorkflowCache:
    def __init__(self, kv: KeyValueStore, ttl_s: float) -> None:
        self._kv = kv
        self._ttl_s = ttl_s

    async def get(self, task_id: str) -> WorkflowRecord | None:
        try:
            raw = await self._kv.get(WORKFLOW_KEY.format(task_id=task_id))
        except Exception as exc:
            logger.warning(
                "workflow cache read failed (%s); using the database", type(exc).__name__
            )
            return None
        if raw is None:
            return None
        try:
            return WorkflowRecord.model_validate_json(raw)
        except ValidationError:
            return None

    async def put(self, record: WorkflowRecord) -> None:
        try:
            await self._kv.set(
                WORKFLOW_KEY.format(task_id=record.task_id),
                record.model_dump_json().encode(),
                ttl_s=self._ttl_s,
            )
        except Exception as exc:
            logger.warning("workflow cache write failed (%s)", type(exc).__name__)

    async def put_many(self, records: Sequence[WorkflowRecord]) -> list[None]:
        """:meth:`put` for each, in one round trip (a :class:`Coalescer` flush)."""
        items = [
            (WORKFLOW_KEY.format(task_id=r.task_id), r.model_dump_json().encode()) for r in records
        ]
        try:
            await self._kv.set_many(items, ttl_s=self._ttl_s)
        except Exception as exc:
            logger.warning("workflow cache write failed (%s)", type(exc).__name__)
        return [None] * len(records)

    async def delete(self, task_id: str) -> None:
        try:
            await self._kv.delete(WORKFLOW_KEY.format(task_id=task_id))
        except Exception as exc:
            logger.warning("workflow cache delete failed (%s)", type(exc).__name__)
