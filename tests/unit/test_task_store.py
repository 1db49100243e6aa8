"""The task store: canceling a record is a compare and set (a worker's result
written while the cancel is under way stays; a task still running ends canceled);
a record is read with its live progress in one round trip."""

from __future__ import annotations

from collections.abc import Sequence

from core_base.adapters.kv_memory import MemoryStore
from core_base.contracts import TaskResult
from core_base.domain import Kind, TaskStatus
from core_base.generation.task_store import TaskStore, claim_key, task_key

SERVICE = "audio_gen"
TASK_ID = "t-1"


class FinishingDuringCancel(MemoryStore):
    """Writes ``finished`` as a worker would, just after the first read of the record."""

    def __init__(self, finished: TaskResult) -> None:
        super().__init__()
        self._finished: TaskResult | None = finished

    async def get(self, key: str) -> bytes | None:
        raw = await super().get(key)
        if self._finished is not None and key == task_key(SERVICE, TASK_ID):
            finished, self._finished = self._finished, None
            await self.set(key, finished.to_bytes())
        return raw


def record(status: TaskStatus) -> TaskResult:
    return TaskResult(task_id=TASK_ID, kind=Kind.SOUND, status=status)


async def test_a_result_written_during_the_cancel_is_not_overwritten() -> None:
    succeeded = record(TaskStatus.SUCCEEDED)
    store = TaskStore(FinishingDuringCancel(succeeded), SERVICE, ttl_s=60)
    await store.put(record(TaskStatus.RUNNING))
    assert await store.cancel_unless_ended(TASK_ID, now=1.0) == (succeeded, False)
    stored = await store.get(TASK_ID)
    assert stored is not None and stored.status == TaskStatus.SUCCEEDED


async def test_a_running_task_is_canceled_and_an_unknown_one_is_none() -> None:
    store = TaskStore(MemoryStore(), SERVICE, ttl_s=60)
    assert await store.cancel_unless_ended(TASK_ID, now=1.0) is None
    await store.put(record(TaskStatus.RUNNING))
    outcome = await store.cancel_unless_ended(TASK_ID, now=1.0)
    assert outcome is not None
    canceled, canceled_now = outcome
    assert canceled_now and (canceled.status, canceled.error) == (TaskStatus.CANCELED, "canceled")
    assert await store.get(TASK_ID) == canceled
    assert await store.cancel_unless_ended(TASK_ID, now=2.0) == (canceled, False)
    left_s = await store.ttl(TASK_ID)
    assert left_s is not None and left_s > 0


class CountingStore(MemoryStore):
    """Counts the round trips a real store would make."""

    def __init__(self) -> None:
        super().__init__()
        self.round_trips = 0

    async def get(self, key: str) -> bytes | None:
        self.round_trips += 1
        return await super().get(key)

    async def get_many(self, keys: Sequence[str]) -> list[bytes | None]:
        self.round_trips += 1
        return [await super(CountingStore, self).get(key) for key in keys]


async def test_a_running_record_is_read_with_its_progress_in_one_round_trip() -> None:
    kv = CountingStore()
    store = TaskStore(kv, SERVICE, ttl_s=60)
    await store.put(record(TaskStatus.RUNNING))
    await store.set_progress(TASK_ID, 0.25)
    kv.round_trips = 0

    read = await store.get(TASK_ID)

    assert read is not None and (read.status, read.progress) == (TaskStatus.RUNNING, 0.25)
    assert kv.round_trips == 1
    assert await store.get("unknown") is None


async def test_a_task_is_claimed_by_one_worker_at_a_time() -> None:
    """The claim a worker holds while it generates a task: taken with the record's
    read; another claimant sees who holds it; renewing takes a claim that ran out
    again but never one another took; releasing lets go of one's own only."""
    kv = MemoryStore()
    store = TaskStore(kv, SERVICE, ttl_s=60)
    await store.put(record(TaskStatus.RUNNING))
    first, second = b"pod-a:1:aa#1", b"pod-b:1:bb#1"
    claimed = await store.check_and_claim([TASK_ID, "t-2"], first)
    assert [(r and r.status, holder) for r, holder in claimed] == [
        (TaskStatus.RUNNING, None),
        (None, None),
    ]
    assert [holder for _, holder in await store.check_and_claim([TASK_ID], second)] == [first]
    assert await store.get_with_holder(TASK_ID) == (await store.get(TASK_ID), first)

    await kv.delete(claim_key(SERVICE, "t-2"))  # ran out
    assert await store.renew_claims({TASK_ID: first, "t-2": first}) == {}
    assert (await store.get_with_holder("t-2"))[1] == first
    left_s = await kv.ttl(claim_key(SERVICE, TASK_ID))
    assert left_s is not None and left_s > 0
    assert await store.renew_claims({TASK_ID: second}) == {TASK_ID: first}
    await store.release_claims([TASK_ID], second)
    assert (await store.get_with_holder(TASK_ID))[1] == first
    await store.release_claims([TASK_ID, "t-2"], first)
    assert [holder for _, holder in await store.check_and_claim([TASK_ID], second)] == [None]
    assert await store.renew_claims({TASK_ID: first}) == {TASK_ID: second}
