"""A generation service's task records in the key-value store.

The record is a ``TaskResult`` (status, output, error, reproducibility record);
it expires after ``RESULT_TTL``. Progress is a separate small key, merged into
the record when read, so the worker can report it often without racing the
final write.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from core_base.constants import TASK_CLAIM_KEY, TASK_CLAIM_TTL_S, TASK_KEY, TASK_PROGRESS_KEY
from core_base.contracts import TaskResult
from core_base.domain import TaskStatus
from core_base.errors import UnavailableError
from core_base.ports.kv import KeyValueStore

# A finished record as stored (compact JSON; a quote inside a string value is
# escaped, so no text can fake one): see :meth:`TaskStore.put_unless_finished`.
_FINISHED = tuple(f'"status":"{s.value}"'.encode() for s in TaskStatus if s.is_terminal)
# A record changes a few times in its life (running, then its result), so a
# compare-and-set that keeps losing means something else is wrong.
_CANCEL_TRIES = 5


def task_key(service_name: str, task_id: str) -> str:
    return TASK_KEY.format(service=service_name, task_id=task_id)


def progress_key(service_name: str, task_id: str) -> str:
    return TASK_PROGRESS_KEY.format(service=service_name, task_id=task_id)


def claim_key(service_name: str, task_id: str) -> str:
    return TASK_CLAIM_KEY.format(service=service_name, task_id=task_id)


class TaskStore:
    def __init__(self, kv: KeyValueStore, service_name: str, ttl_s: float) -> None:
        self._kv = kv
        self._service = service_name
        self._ttl_s = ttl_s

    async def get(self, task_id: str) -> TaskResult | None:
        """The record with its live progress, in one round trip (a result poll and
        the worker's check before the model both wait on it)."""
        raw, progress = await self._kv.get_many(
            [task_key(self._service, task_id), progress_key(self._service, task_id)]
        )
        if raw is None:
            return None
        result = TaskResult.from_bytes(raw)
        if not result.status.is_terminal:
            if progress is not None:
                result.progress = max(result.progress, min(1.0, float(progress)))
        return result

    async def get_many(self, task_ids: Sequence[str]) -> list[TaskResult | None]:
        """The records in order (None where missing), in one round trip; unlike
        :meth:`get`, without the separately stored progress."""
        raws = await self._kv.get_many([task_key(self._service, t) for t in task_ids])
        return [None if raw is None else TaskResult.from_bytes(raw) for raw in raws]

    async def check_and_claim(
        self, task_ids: Sequence[str], claimant: bytes, *, take_over: bytes = b""
    ) -> list[tuple[TaskResult | None, bytes | None]]:
        """Each task's record, and the task claimed for ``claimant`` (see
        TASK_CLAIM_KEY) unless another holds it, in one round trip: ``(record,
        None)`` when ``claimant`` holds it now, ``(record, holder)`` when another
        does. Claims starting with ``take_over`` are taken over (see
        :meth:`KeyValueStore.hold_many`). (Without the separately stored progress,
        as :meth:`get_many`.)"""
        holders, raws = await self._kv.hold_many(
            [(claim_key(self._service, task_id), claimant) for task_id in task_ids],
            ttl_s=TASK_CLAIM_TTL_S,
            read=[task_key(self._service, task_id) for task_id in task_ids],
            take_over=take_over,
        )
        records = [None if raw is None else TaskResult.from_bytes(raw) for raw in raws]
        return list(zip(records, holders, strict=True))

    async def renew_claims(self, claims: Mapping[str, bytes]) -> dict[str, bytes]:
        """Renew each ``task id -> claimant`` claim (one that ran out is taken again,
        unless another claimant took it meanwhile); the claims others hold now."""
        task_ids = list(claims)
        holders, _ = await self._kv.hold_many(
            [(claim_key(self._service, t), claims[t]) for t in task_ids], ttl_s=TASK_CLAIM_TTL_S
        )
        return {t: holder for t, holder in zip(task_ids, holders, strict=True) if holder}

    async def release_claims(self, task_ids: Sequence[str], claimant: bytes) -> None:
        """Let go of ``claimant``'s claims (never of another's)."""
        await self._kv.delete_many_if_equal(
            [(claim_key(self._service, task_id), claimant) for task_id in task_ids]
        )

    async def get_with_holder(self, task_id: str) -> tuple[TaskResult | None, bytes | None]:
        """The record (without its live progress) and who holds the task, in one round trip."""
        raw, holder = await self._kv.get_many(
            [task_key(self._service, task_id), claim_key(self._service, task_id)]
        )
        return (None if raw is None else TaskResult.from_bytes(raw)), holder

    async def put(self, result: TaskResult) -> None:
        await self._kv.set(
            task_key(self._service, result.task_id), result.to_bytes(), ttl_s=self._ttl_s
        )

    async def put_many(self, results: Sequence[TaskResult]) -> None:
        """:meth:`put` for each, in one round trip."""
        items = [(task_key(self._service, r.task_id), r.to_bytes()) for r in results]
        await self._kv.set_many(items, ttl_s=self._ttl_s)

    async def put_unless_finished(self, result: TaskResult) -> bool:
        """:meth:`put`, unless the task has finished already (a cancel, or a result
        of another worker's, written meanwhile): a worker's late write never undoes
        one. True when written."""
        return (await self.put_many_unless_finished([result]))[0]

    async def put_many_unless_finished(self, results: Sequence[TaskResult]) -> list[bool]:
        """:meth:`put_unless_finished` for each, in one round trip."""
        items = [(task_key(self._service, r.task_id), r.to_bytes()) for r in results]
        return await self._kv.set_many_unless_containing(
            items, markers=_FINISHED, ttl_s=self._ttl_s
        )

    async def create_if_absent(self, result: TaskResult) -> bool:
        """Record a new task; False when one with this id is already recorded."""
        return await self._kv.set_if_absent(
            task_key(self._service, result.task_id), result.to_bytes(), ttl_s=self._ttl_s
        )

    async def create_many_if_absent(self, results: Sequence[TaskResult]) -> list[bool]:
        """:meth:`create_if_absent` for each, in one round trip."""
        items = [(task_key(self._service, r.task_id), r.to_bytes()) for r in results]
        return await self._kv.set_many_if_absent(items, ttl_s=self._ttl_s)

    async def cancel_unless_ended(self, task_id: str, now: float) -> tuple[TaskResult, bool] | None:
        """Record a task canceled unless it has ended: the record as it stands then,
        and whether this call canceled it; None when there is no record. A compare
        and set: a result written meanwhile (a worker finishing) is never
        overwritten by the cancel."""
        key = task_key(self._service, task_id)
        for _ in range(_CANCEL_TRIES):
            raw = await self._kv.get(key)
            if raw is None:
                return None
            current = TaskResult.from_bytes(raw)
            if current.status.is_terminal:
                return current, False
            canceled = current.model_copy(
                update={"status": TaskStatus.CANCELED, "error": "canceled", "updated_at": now}
            )
            if await self._kv.replace_if_equal(key, raw, canceled.to_bytes(), ttl_s=self._ttl_s):
                return canceled, True
        raise UnavailableError(f"task {task_id} kept changing; retry")

    async def set_progress(self, task_id: str, progress: float) -> None:
        await self._kv.set(
            progress_key(self._service, task_id), f"{progress:.4f}".encode(), ttl_s=self._ttl_s
        )

    async def ttl(self, task_id: str) -> float | None:
        return await self._kv.ttl(task_key(self._service, task_id))
