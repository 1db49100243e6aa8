"""``repository.finish_kind`` on PostgreSQL (one statement) and SQLite (statement
by statement): the same rows either way, a repeat writes nothing."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from unittest.mock import ANY

import pytest

from app_api import repository
from app_api.migrations import MIGRATIONS
from app_api.records import WorkflowRecord
from app_api.repository import Delivery
from core_base.contracts import AudioOutput
from core_base.db.migrations import migrate
from core_base.domain import AudioFormat, Kind, TaskStatus
from core_base.ports.database import Database

pytestmark = pytest.mark.integration

CREATED_S = 1_000.0


@pytest.fixture
async def db(new_database: Database) -> AsyncIterator[Database]:
    database = new_database
    await database.connect()
    await migrate(database, MIGRATIONS)
    yield database
    await database.close()


async def new_workflow(
    db: Database, task_id: str = "t-1", *, fanout_at: float = CREATED_S
) -> WorkflowRecord:
    record = WorkflowRecord(
        task_id=task_id,
        user_id="u-1",
        kinds=[Kind.SOUND, Kind.MUSIC],
        request={"prompt": "rain"},
        created_at=CREATED_S,
        updated_at=CREATED_S,
    )
    async with db.transaction() as tx:
        await repository.insert_workflow(tx, record, fanout_at=fanout_at)
    return record


async def finish(
    db: Database,
    status: TaskStatus,
    kind: Kind,
    now: float,
    *,
    error: str | None = None,
    callback_url: str | None = "https://hooks.example.com/x",
) -> tuple[repository.Finished, WorkflowRecord]:
    """What Workflows.apply does: read, work the outcome out, write it."""
    record = await repository.load_workflow(db, "t-1")
    assert record is not None
    seen = {o.kind: o.status for o in record.outputs}
    output = record.output(kind)
    assert output is not None
    output.status, output.error = status, error
    if status == TaskStatus.SUCCEEDED:
        output.output = AudioOutput(
            key=f"audio/t-1/{kind.value}.wav",
            format=AudioFormat.WAV,
            duration=2.5,
            sample_rate=16000,
            channels=1,
            bytes=80044,
        )
    final = [o.status for o in record.outputs]
    delivery = None
    if all(s.is_terminal for s in final):
        failed = TaskStatus.FAILED in final
        record.status = TaskStatus.FAILED if failed else TaskStatus.SUCCEEDED
        record.error = f"{kind.value}: {error}" if failed else None
        record.completed_at = now
        if callback_url:
            delivery = Delivery("msg_1", "t-1", callback_url, "{}", "pending", 0, now)
    written = await repository.finish_kind(
        db, record, output, seen=seen, now=now, delivery=delivery, delivery_due_at=now + 60
    )
    assert written is not None
    return written, record


async def rows(db: Database, table: str) -> list[dict[str, object]]:
    return await db.fetch(f"SELECT * FROM {table}")


async def test_the_last_kind_finishes_the_workflow_with_stats_and_a_delivery(
    db: Database,
) -> None:
    await new_workflow(db)
    written, _ = await finish(db, TaskStatus.SUCCEEDED, Kind.SOUND, CREATED_S + 4)
    assert written == repository.Finished(kind=True, workflow=False, delivery=False)
    assert await rows(db, "app_stats") == []
    assert await rows(db, "app_webhook_deliveries") == []

    written, _ = await finish(
        db, TaskStatus.FAILED, Kind.MUSIC, CREATED_S + 9, error="out of memory"
    )
    assert written == repository.Finished(kind=True, workflow=True, delivery=True)
    loaded = await repository.load_workflow(db, "t-1")
    assert loaded is not None
    assert (loaded.status, loaded.error, loaded.completed_at) == (
        TaskStatus.FAILED,
        "music: out of memory",
        CREATED_S + 9,
    )
    music = loaded.output(Kind.MUSIC)
    assert music is not None and (music.status, music.error) == (TaskStatus.FAILED, "out of memory")
    sound = loaded.output(Kind.SOUND)
    assert sound is not None and sound.output is not None and sound.output.duration == 2.5
    (stats,) = await rows(db, "app_stats")
    assert (stats["status"], stats["audio_seconds"], stats["latency_s"]) == ("failed", 2.5, 9.0)
    assert (stats["user_id"], stats["completed_at"]) == ("u-1", CREATED_S + 9)
    (delivery,) = await rows(db, "app_webhook_deliveries")
    assert (delivery["id"], delivery["status"], delivery["next_attempt_at"]) == (
        "msg_1",
        "pending",
        CREATED_S + 69,
    )


async def test_a_repeated_outcome_writes_nothing(db: Database) -> None:
    await new_workflow(db)
    await finish(db, TaskStatus.SUCCEEDED, Kind.SOUND, CREATED_S + 1)
    await finish(db, TaskStatus.SUCCEEDED, Kind.MUSIC, CREATED_S + 2)
    # A late repeat, worked out on a stale read (as if both kinds were still
    # running): the statuses changed since, so nothing is written.
    record = await repository.load_workflow(db, "t-1")
    assert record is not None
    output = record.output(Kind.MUSIC)
    assert output is not None
    stale = {Kind.SOUND: TaskStatus.RUNNING, Kind.MUSIC: TaskStatus.RUNNING}
    conflict = await repository.finish_kind(
        db, record, output, seen=stale, now=CREATED_S + 3, delivery=None, delivery_due_at=0
    )
    assert conflict is None
    # Worked out on a current read, the conditional updates still refuse it.
    current = {o.kind: o.status for o in record.outputs}
    written = await repository.finish_kind(
        db, record, output, seen=current, now=CREATED_S + 3, delivery=None, delivery_due_at=0
    )
    assert written == repository.Finished(kind=False, workflow=False, delivery=False)
    assert len(await rows(db, "app_stats")) == 1
    assert len(await rows(db, "app_webhook_deliveries")) == 1


async def test_without_a_callback_url_there_is_no_delivery(db: Database) -> None:
    await new_workflow(db)
    await finish(db, TaskStatus.SUCCEEDED, Kind.SOUND, CREATED_S + 1, callback_url=None)
    written, record = await finish(
        db, TaskStatus.SUCCEEDED, Kind.MUSIC, CREATED_S + 2, callback_url=None
    )
    assert written == repository.Finished(kind=True, workflow=True, delivery=False)
    assert record.status == TaskStatus.SUCCEEDED
    (stats,) = await rows(db, "app_stats")
    assert (stats["status"], stats["audio_seconds"]) == ("succeeded", 5.0)
    assert await rows(db, "app_webhook_deliveries") == []


async def test_running_moves_the_kind_and_the_workflow_forward_only(db: Database) -> None:
    await new_workflow(db)
    assert await repository.mark_running(db, "t-1", Kind.SOUND, 0.4, CREATED_S + 1)
    assert await repository.mark_running(db, "t-1", Kind.SOUND, 0.2, CREATED_S + 2)
    loaded = await repository.load_workflow(db, "t-1")
    assert loaded is not None and loaded.status == TaskStatus.RUNNING
    sound = loaded.output(Kind.SOUND)
    assert sound is not None
    assert (sound.status, sound.progress) == (TaskStatus.RUNNING, 0.4)  # never backwards

    await finish(db, TaskStatus.SUCCEEDED, Kind.SOUND, CREATED_S + 3)
    await finish(db, TaskStatus.SUCCEEDED, Kind.MUSIC, CREATED_S + 4)
    # A late progress report changes nothing once the kind (and workflow) finished.
    assert not await repository.mark_running(db, "t-1", Kind.SOUND, 0.9, CREATED_S + 5)
    loaded = await repository.load_workflow(db, "t-1")
    assert loaded is not None and loaded.status == TaskStatus.SUCCEEDED
    assert not await repository.mark_running(db, "no-such-task", Kind.SOUND, 0.1, CREATED_S)


async def test_idempotency_keys_are_forgotten_by_age_through_an_index(db: Database) -> None:
    """The reconciler forgets old keys every round: by an index, not a full scan."""
    if db.dialect == "postgresql":
        query = "SELECT indexdef AS definition FROM pg_indexes WHERE tablename = $1"
    else:
        query = "SELECT sql AS definition FROM sqlite_master WHERE type = 'index' AND tbl_name = $1"
    definitions = [str(r["definition"]) for r in await db.fetch(query, "app_idempotency_keys")]
    assert any("(created_at)" in definition for definition in definitions), definitions
    for age in (1.0, 5.0):
        await db.execute(
            "INSERT INTO app_idempotency_keys VALUES ($1, $2, 'h', 't', $3)", "u1", f"k{age}", age
        )
    assert await repository.forget_idempotency_keys(db, 3.0) == 1
    remaining = await db.fetch("SELECT idempotency_key FROM app_idempotency_keys")
    assert remaining == [{"idempotency_key": "k5.0"}]


async def test_replicas_racing_for_due_work_each_get_it_once(db: Database) -> None:
    """Two App API replicas polling at once: every due fan-out and delivery is
    claimed by exactly one of them (a conditional update each)."""
    await new_workflow(db)
    now = CREATED_S + 1
    jobs = await repository.due_fanouts(db, now, 10)
    assert {job.kind for job in jobs} == {Kind.SOUND, Kind.MUSIC}
    for job in jobs:
        both = await asyncio.gather(
            repository.claim_fanout(db, job, now, now + 30),
            repository.claim_fanout(db, job, now, now + 30),
        )
        assert sorted(both) == [False, True]
    await repository.insert_delivery(db, "d-1", "t-1", "https://hooks.example.com/x", "{}", now)
    [(delivery_id, _)] = await repository.due_deliveries(db, now, 10)
    both = await asyncio.gather(
        repository.claim_delivery(db, delivery_id, now, now + 60),
        repository.claim_delivery(db, delivery_id, now, now + 60),
    )
    assert sorted(both) == [False, True]
    assert await repository.due_deliveries(db, now + 1, 10) == []  # leased
    assert await repository.due_deliveries(db, now + 61, 10) == [
        (delivery_id, ANY)
    ]  # lease ran out


async def test_postponed_deliveries_fall_due_later_unless_taken_meanwhile(db: Database) -> None:
    now = CREATED_S + 1
    for index in (1, 2, 3):
        record = WorkflowRecord(
            task_id=f"t-{index}", user_id="u-1", kinds=[Kind.SOUND],
            created_at=CREATED_S, updated_at=CREATED_S,
        )  # fmt: skip
        async with db.transaction() as tx:
            await repository.insert_workflow(tx, record, fanout_at=CREATED_S)
        await repository.insert_delivery(
            db, f"d-{index}", f"t-{index}", "https://hooks.example.com/x", "{}", now
        )
    assert await repository.claim_delivery(db, "d-3", now, now + 60)

    await repository.postpone_deliveries(db, ["d-1", "d-2", "d-3"], now, now + 10)

    assert await repository.due_deliveries(db, now + 9, 10) == []
    due = await repository.due_deliveries(db, now + 10, 10)
    assert sorted(delivery_id for delivery_id, _ in due) == ["d-1", "d-2"]
    # The claimed one keeps its lease.
    assert await repository.due_deliveries(db, now + 60, 10) == [
        ("d-1", ANY),
        ("d-2", ANY),
        ("d-3", ANY),
    ]


async def test_leases_handed_back_are_due_at_once_unless_taken_meanwhile(db: Database) -> None:
    """A stopping App API hands its deliveries back by their exact leases (a wall
    clock's fractions of a second kept): one another dispatcher took since stays."""
    now = 1_764_900_000.123456
    lease = now + 60.000001
    for index in (1, 2, 3):
        record = WorkflowRecord(
            task_id=f"t-{index}", user_id="u-1", kinds=[Kind.SOUND],
            created_at=now, updated_at=now,
        )  # fmt: skip
        async with db.transaction() as tx:
            await repository.insert_workflow(tx, record, fanout_at=now)
        await repository.insert_delivery(
            db, f"d-{index}", f"t-{index}", "https://hooks.example.com/x", "{}", now,
            next_attempt_at=lease,
        )  # fmt: skip
    assert await repository.claim_delivery(db, "d-3", lease, lease + 60)

    leases = [(f"d-{index}", lease) for index in (1, 2, 3)]
    assert await repository.release_deliveries(db, leases, now + 1) == 2

    due = await repository.due_deliveries(db, now + 1, 10)
    assert sorted(delivery_id for delivery_id, _ in due) == ["d-1", "d-2"]


async def test_fan_outs_handed_back_are_due_at_once_unless_taken_or_sent(db: Database) -> None:
    now = 1_764_900_000.123456
    lease = now + 30.000001
    for index in (1, 2, 3):
        await new_workflow(db, f"t-{index}", fanout_at=lease)
    # t-2's sound was taken by another dispatcher after the lease ran out; t-3's was sent.
    taken = repository.FanoutJob("t-2", Kind.SOUND, 0, now)
    assert await repository.claim_fanout(db, taken, lease, lease + 30)
    await repository.mark_dispatched(db, "t-3", Kind.SOUND, now)

    leases = [(f"t-{index}", Kind.SOUND, lease) for index in (1, 2, 3)]
    assert await repository.release_fanouts(db, leases, now + 1) == 1

    due = await repository.due_fanouts(db, now + 1, 10)
    assert [(job.task_id, job.kind) for job in due] == [("t-1", Kind.SOUND)]


# --- retention ----------------------------------------------------------------------------------


async def finished_workflow(
    db: Database, task_id: str, completed_at: float, *, delivery_status: str | None = None
) -> None:
    """A one-kind workflow that succeeded at ``completed_at`` (with its stats record,
    an idempotency key and, given ``delivery_status``, a webhook delivery)."""
    record = WorkflowRecord(
        task_id=task_id,
        user_id="u-1",
        kinds=[Kind.SOUND],
        request={"prompt": "rain"},
        created_at=completed_at - 5,
        updated_at=completed_at - 5,
    )
    async with db.transaction() as tx:
        await repository.insert_workflow(tx, record, fanout_at=record.created_at)
        await repository.remember_idempotency_key(
            tx, "u-1", f"key-{task_id}", "hash", task_id, record.created_at
        )
    loaded = await repository.load_workflow(db, task_id)
    assert loaded is not None
    seen = {o.kind: o.status for o in loaded.outputs}
    output = loaded.output(Kind.SOUND)
    assert output is not None
    output.status = TaskStatus.SUCCEEDED
    output.output = AudioOutput(
        key=f"audio/{task_id}/sound.wav",
        format=AudioFormat.WAV,
        duration=1.0,
        sample_rate=16000,
        channels=1,
        bytes=32044,
    )
    loaded.status, loaded.completed_at = TaskStatus.SUCCEEDED, completed_at
    delivery = None
    if delivery_status is not None:
        delivery = Delivery(f"msg-{task_id}", task_id, "https://h.example/x", "{}", "pending", 0, 0)
    written = await repository.finish_kind(
        db, loaded, output, seen=seen, now=completed_at, delivery=delivery, delivery_due_at=0
    )
    assert written is not None and written.workflow
    if delivery_status is not None and delivery_status != "pending":
        await repository.record_delivery_attempt(
            db,
            f"msg-{task_id}",
            attempt=1,
            status=delivery_status,
            next_attempt_at=completed_at,
            error=None,
            status_code=204,
            now=completed_at,
        )


async def test_retention_pages_workflows_finished_at_the_same_moment_one_by_one(
    db: Database,
) -> None:
    """Ties on completed_at are broken by task id: no page boundary between them
    skips or repeats one."""
    for task_id in ("tie-b", "tie-a", "tie-c"):
        await finished_workflow(db, task_id, CREATED_S + 5, delivery_status="delivered")
    seen: list[str] = []
    after: repository.Expired | None = None
    while page := await repository.expired_workflows(db, CREATED_S + 50, 1, after=after):
        seen.append(page[0].task_id)
        after = page[-1]
    assert seen == ["tie-a", "tie-b", "tie-c"]


async def test_retention_takes_finished_workflows_oldest_first_and_keeps_their_stats(
    db: Database,
) -> None:
    for index in range(4):
        await finished_workflow(db, f"old-{index}", CREATED_S + index, delivery_status="delivered")
    await finished_workflow(db, "old-retrying", CREATED_S, delivery_status="pending")
    await finished_workflow(db, "recent", CREATED_S + 100)
    await new_workflow(db)  # "t-1": still queued, created long ago

    cutoff = CREATED_S + 50

    async def expired_ids(
        before: float, limit: int, after: repository.Expired | None = None
    ) -> list[str]:
        page = await repository.expired_workflows(db, before, limit, after=after)
        return [workflow.task_id for workflow in page]

    assert await expired_ids(cutoff, 3) == ["old-0", "old-1", "old-2"]
    expired = await expired_ids(cutoff, 100)
    assert expired == ["old-0", "old-1", "old-2", "old-3"]  # not the one still retrying
    assert await expired_ids(CREATED_S + 1000, 100) == [*expired, "recent"]
    # Paging past a page whose workflows stay (their audio refused):
    (first_page_end,) = await repository.expired_workflows(db, cutoff, 1)
    assert await expired_ids(cutoff, 2, after=first_page_end) == ["old-1", "old-2"]
    assert await repository.object_keys(db, ["old-0", "old-3"]) == {
        "old-0": ["audio/old-0/sound.wav"],
        "old-3": ["audio/old-3/sound.wav"],
    }
    # No output recorded (a kind canceled while its worker went on and uploaded it
    # anyway): each kind's key in the format asked for.
    assert await repository.object_keys(db, ["t-1"]) == {
        "t-1": ["audio/t-1/music.wav", "audio/t-1/sound.wav"]
    }
    by_kind = await repository.user_stats_by_kind(db, "u-1", 0, repository.FOREVER_S)

    # An active workflow among them is never deleted, whatever the caller says.
    assert await repository.delete_workflows(db, [*expired, "t-1"]) == 4
    assert await repository.delete_workflows(db, expired) == 0
    assert await repository.load_workflow(db, "old-0") is None
    assert await repository.load_workflow(db, "t-1") is not None
    left = {
        table: sorted(str(row["task_id"]) for row in await rows(db, table))
        for table in (
            "app_workflows",
            "app_workflow_outputs",
            "app_webhook_deliveries",
            "app_idempotency_keys",
        )
    }
    assert left == {
        "app_workflows": ["old-retrying", "recent", "t-1"],
        "app_workflow_outputs": ["old-retrying", "recent", "t-1", "t-1"],
        "app_webhook_deliveries": ["old-retrying"],
        "app_idempotency_keys": ["old-retrying", "recent"],
    }
    stats = sorted(str(row["task_id"]) for row in await rows(db, "app_stats"))
    assert stats == ["old-0", "old-1", "old-2", "old-3", "old-retrying", "recent"]
    # Each kind's counters too: from the deleted outputs' counters, where they went.
    assert await repository.user_stats_by_kind(db, "u-1", 0, repository.FOREVER_S) == by_kind
    (sound,) = by_kind
    assert (sound["kind"], sound["total"], sound["succeeded"], sound["audio_seconds"]) == (
        "sound",
        6,
        6,
        6.0,
    )
    assert sound["avg_latency_s"] == pytest.approx(5.0)


async def test_mark_dispatched_many_marks_exactly_the_pairs_given(db: Database) -> None:
    for task_id in ("a", "b", "c"):
        await new_workflow(db, task_id, fanout_at=CREATED_S + 30)
    await repository.schedule_fanout_retry(db, "a", Kind.SOUND, CREATED_S + 5, "down", CREATED_S)

    pairs = [("a", Kind.SOUND), ("b", Kind.MUSIC), ("a", Kind.SOUND)]  # a pair twice
    await repository.mark_dispatched_many(db, pairs, CREATED_S + 1)

    rows = await db.fetch(
        "SELECT task_id, kind, dispatched_at, next_fanout_at, fanout_attempts, error"
        " FROM app_workflow_outputs ORDER BY task_id, kind"
    )
    marked = {(r["task_id"], r["kind"]) for r in rows if r["dispatched_at"] is not None}
    assert marked == {("a", "sound"), ("b", "music")}
    by_pair = {(r["task_id"], r["kind"]): r for r in rows}
    a_sound = by_pair[("a", "sound")]
    # One retry scheduled, then one dispatch: the repeated pair counts once.
    assert (a_sound["fanout_attempts"], a_sound["next_fanout_at"], a_sound["error"]) == (
        2,
        None,
        None,
    )
    untouched = by_pair[("c", "sound")]
    assert (untouched["fanout_attempts"], untouched["next_fanout_at"]) == (0, CREATED_S + 30)


async def test_hasten_fanout_retries_makes_only_that_kinds_waiting_retries_due(
    db: Database,
) -> None:
    for task_id in ("waiting", "other-kind", "new", "sent", "claimed"):
        await new_workflow(db, task_id, fanout_at=CREATED_S + 30)  # "new": its creator's lease
    for task_id in ("waiting", "sent"):
        await repository.schedule_fanout_retry(
            db, task_id, Kind.SOUND, CREATED_S + 10, "down", CREATED_S
        )
    await repository.schedule_fanout_retry(
        db, "claimed", Kind.SOUND, CREATED_S + 5, "down", CREATED_S
    )
    await repository.schedule_fanout_retry(
        db, "other-kind", Kind.MUSIC, CREATED_S + 10, "down", CREATED_S
    )
    await repository.mark_dispatched_many(db, [("sent", Kind.SOUND)], CREATED_S + 1)
    # Another dispatcher submits "claimed" at the end of its backoff, for a lease
    # longer than any backoff.
    claimed = repository.FanoutJob("claimed", Kind.SOUND, 1, CREATED_S)
    assert await repository.claim_fanout(db, claimed, CREATED_S + 5, CREATED_S + 35)

    now = CREATED_S + 6
    assert await repository.hasten_fanout_retries(db, Kind.SOUND, now, max_wait_s=15.0) == 1
    due = await repository.due_fanouts(db, now, 100)
    assert [(job.task_id, job.kind) for job in due] == [("waiting", Kind.SOUND)]


async def test_a_delivery_attempt_is_recorded_once_over_the_attempt_before_it(
    db: Database,
) -> None:
    await new_workflow(db, "t-hook")
    assert await repository.insert_delivery(db, "msg-1", "t-hook", "https://h/x", "{}", CREATED_S)

    async def record(attempt: int, status: str) -> tuple[str, int]:
        await repository.record_delivery_attempt(
            db, "msg-1", attempt=attempt, status=status, next_attempt_at=CREATED_S + 60,
            error=None if status == "delivered" else "HTTP 500", status_code=None, now=CREATED_S,
        )  # fmt: skip
        delivery = await repository.get_delivery(db, "msg-1")
        assert delivery is not None
        return delivery.status, delivery.attempts

    assert await record(1, "pending") == ("pending", 1)
    assert await record(1, "pending") == ("pending", 1)  # written again: its answer was lost
    assert await record(3, "pending") == ("pending", 1)  # no attempt 2 recorded
    # Another dispatcher's attempt 1 failed first: this attempt 1 got through.
    assert await record(1, "delivered") == ("delivered", 1)
    assert await record(2, "pending") == ("delivered", 1)  # nothing after the delivery
