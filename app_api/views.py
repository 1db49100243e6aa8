"""Turning a workflow record into the marketplace's result shape, with fresh
presigned URLs and, while a kind runs, its live progress from the sub-service."""

from __future__ import annotations

import asyncio
import functools
import logging
from datetime import UTC, datetime

from app_api.best_effort import BestEffort
from app_api.records import OutputRecord, WorkflowRecord
from app_api.schemas import OutputView, ResultView
from core_base.contracts import TaskResult
from core_base.domain import TaskStatus
from core_base.generation.task_store import TaskStore
from core_base.ports.kv import KeyValueStore
from core_base.ports.storage import ObjectStorage
from core_base.services import service_spec

logger = logging.getLogger(__name__)


def iso(epoch_s: float | None) -> str | None:
    if epoch_s is None:
        return None
    return datetime.fromtimestamp(epoch_s, tz=UTC).isoformat().replace("+00:00", "Z")


class ResultRenderer:
    def __init__(
        self,
        storage: ObjectStorage,
        kv: KeyValueStore,
        *,
        presign_expires_s: int,
        ttl_s: float,
        guard: BestEffort | None = None,
    ) -> None:
        self._storage = storage
        self._kv = kv
        self._expires_s = presign_expires_s
        self._ttl_s = ttl_s
        self._guard = guard or BestEffort("live progress")

    async def render(self, record: WorkflowRecord, *, live: bool = True) -> ResultView:
        if live and not record.status.is_terminal:
            await self._merge_live_progress(record)
        status = record.status
        if status == TaskStatus.QUEUED and any(
            o.status != TaskStatus.QUEUED for o in record.outputs
        ):
            # A kind has started or ended: the workflow is under way, whether or not
            # a running report reached the App API (a short generation sends none).
            status = TaskStatus.RUNNING
        outputs = [await self._output(o) for o in record.outputs]
        return ResultView(
            task_id=record.task_id,
            user_id=record.user_id,
            status=status,
            progress=1.0 if record.status.is_terminal else record.progress,
            kinds=record.kinds,
            outputs=outputs,
            error=record.error,
            created_at=iso(record.created_at) or "",
            completed_at=iso(record.completed_at),
        )

    async def _output(self, o: OutputRecord) -> OutputView:
        view = OutputView(
            kind=o.kind,
            status=o.status,
            progress=1.0 if o.status.is_terminal else round(o.progress, 4),
            error=o.error,
        )
        if o.status == TaskStatus.SUCCEEDED and o.output is not None:
            try:
                view.url = await self._storage.presigned_url(
                    o.output.key, expires_s=self._expires_s
                )
            except Exception as exc:
                logger.error("presigning %s failed: %s", o.output.key, type(exc).__name__)
            view.format = o.output.format
            view.duration = o.output.duration
            view.sample_rate = o.output.sample_rate
            view.channels = o.output.channels
            view.bytes = o.output.bytes
            view.generation = o.output.generation or None
        return view

    async def _merge_live_progress(self, record: WorkflowRecord) -> None:
        """The sub-services' records of the kinds not ended here: a kind the worker
        has started shows as running (its running report comes only after a moment,
        and not at all for a short generation), with its live progress."""
        active = [o for o in record.outputs if o.status in (TaskStatus.QUEUED, TaskStatus.RUNNING)]
        # The kinds' records are read at once: a poll waits for one round trip, not one per kind.
        lives = await asyncio.gather(*(self._live(record.task_id, o) for o in active))
        for output, live in zip(active, lives, strict=True):
            if live is None or live.status == TaskStatus.QUEUED:
                continue
            # An ended live record means the worker is done and its callback is on
            # the way: the kind counts as complete (its progress never goes back).
            live_progress = 1.0 if live.status.is_terminal else min(1.0, live.progress)
            output.status = TaskStatus.RUNNING
            output.progress = max(output.progress, live_progress)

    async def _live(self, task_id: str, output: OutputRecord) -> TaskResult | None:
        store = TaskStore(self._kv, service_spec(output.kind).name, self._ttl_s)
        live: TaskResult | None = await self._guard.run(
            "read", functools.partial(store.get, task_id)
        )
        return live
