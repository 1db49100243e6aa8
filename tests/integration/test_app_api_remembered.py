"""Results for workflows this App API created are worked out on the record it
remembers (no read first); a remembered record gone stale (another App API
finished a kind meanwhile) writes nothing wrong. Two ``Workflows`` on one
database stand for two App API processes; PostgreSQL and SQLite."""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import pytest
from prometheus_client import CollectorRegistry

from app_api import repository
from app_api.cache import WorkflowCache
from app_api.metrics import AppMetrics
from app_api.migrations import MIGRATIONS
from app_api.records import WorkflowRecord
from app_api.remembered import RememberedWorkflows
from app_api.repository import Delivery
from app_api.workflow import FinishedWorkflow, Workflows
from core_base.adapters.kv_memory import MemoryStore
from core_base.contracts import AudioOutput, TaskResult
from core_base.db.migrations import migrate
from core_base.domain import AudioFormat, Kind, TaskStatus
from core_base.ports.database import Database

pytestmark = pytest.mark.integration

HOOK = "https://hooks.example.com/x"
# The tests' own reads, not counted by ``reads``.
load_workflow = repository.load_workflow


@pytest.fixture
async def db(new_database: Database) -> AsyncIterator[Database]:
    await new_database.connect()
    await migrate(new_database, MIGRATIONS)
    yield new_database
    await new_database.close()


@pytest.fixture
def reads(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """The task ids ``Workflows`` reads from the database, in order."""
    read: list[str] = []

    async def counting(db: Database, task_id: str) -> WorkflowRecord | None:
        read.append(task_id)
        return await load_workflow(db, task_id)

    monkeypatch.setattr(repository, "load_workflow", counting)
    return read


class Process:
    """One App API's ``Workflows`` and what it finished."""

    def __init__(
        self,
        db: Database,
        remembered: RememberedWorkflows | None = None,
        render_webhook: Callable[[WorkflowRecord], Awaitable[bytes]] | None = None,
        callback_url: str | None = HOOK,
    ) -> None:
        self.done: list[FinishedWorkflow] = []
        self.workflows = Workflows(
            db,
            WorkflowCache(MemoryStore(), ttl_s=60),
            AppMetrics(CollectorRegistry()),
            default_callback_url=callback_url,
            on_finished=self.done.append,
            render_webhook=render_webhook,
            remembered=remembered,
        )

    @property
    def finished(self) -> list[tuple[WorkflowRecord, Delivery | None]]:
        return [(done.record, done.delivery) for done in self.done]

    async def create(self, *kinds: Kind) -> str:
        now = time.time()
        record = WorkflowRecord(
            task_id=str(uuid.uuid4()),
            user_id="u-1",
            kinds=list(kinds),
            request={"prompt": "rain", "duration": 1.0},
            created_at=now,
            updated_at=now,
        )
        created = await self.workflows.create(record, None)
        await self.workflows.close()  # the cache write too
        return created.task_id


def succeeded(task_id: str, kind: Kind) -> TaskResult:
    output = AudioOutput(
        key=f"audio/{task_id}/{kind.value}.wav",
        format=AudioFormat.WAV,
        duration=1.0,
        sample_rate=16_000,
        channels=1,
        bytes=32_044,
    )
    return TaskResult(
        task_id=task_id, kind=kind, status=TaskStatus.SUCCEEDED, progress=1.0, output=output
    )


async def rows(db: Database, sql: str, *args: Any) -> list[dict[str, Any]]:
    return [dict(row) for row in await db.fetch(sql, *args)]


async def test_the_creator_finishes_a_workflow_without_reading_it(
    db: Database, reads: list[str]
) -> None:
    creator = Process(db)
    task_id = await creator.create(Kind.SOUND)

    assert await creator.workflows.apply(succeeded(task_id, Kind.SOUND))

    assert reads == []
    ((record, delivery),) = creator.finished
    assert record.status == TaskStatus.SUCCEEDED and delivery is not None
    stored = await load_workflow(db, task_id)
    assert stored is not None and stored.status == TaskStatus.SUCCEEDED
    assert stored.outputs[0].output == succeeded(task_id, Kind.SOUND).output
    assert len(await rows(db, "SELECT * FROM app_stats WHERE task_id = $1", task_id)) == 1
    # A repeat is not taken from memory again: it is read, and changes nothing.
    assert not await creator.workflows.apply(succeeded(task_id, Kind.SOUND))
    assert reads == [task_id]


async def test_a_stale_remembered_record_reads_again_and_finishes_right(
    db: Database, reads: list[str]
) -> None:
    creator, other = Process(db), Process(db)
    task_id = await creator.create(Kind.SOUND, Kind.MUSIC)
    # Another App API takes the music result: the creator's memory still says queued.
    assert await other.workflows.apply(succeeded(task_id, Kind.MUSIC))
    assert other.finished == [] and reads == [task_id]

    assert await creator.workflows.apply(succeeded(task_id, Kind.SOUND))

    # The remembered record's write was refused; the second round read the workflow.
    assert reads == [task_id, task_id]
    ((record, delivery),) = creator.finished
    assert record.status == TaskStatus.SUCCEEDED
    assert [(o.kind, o.status) for o in record.outputs] == [
        (Kind.SOUND, TaskStatus.SUCCEEDED),
        (Kind.MUSIC, TaskStatus.SUCCEEDED),
    ]
    assert delivery is not None
    (stored,) = await rows(
        db, "SELECT payload FROM app_webhook_deliveries WHERE task_id = $1", task_id
    )
    payload = json.loads(stored["payload"])
    assert [o["status"] for o in payload["outputs"]] == ["succeeded", "succeeded"]
    stats = await rows(db, "SELECT audio_seconds FROM app_stats WHERE task_id = $1", task_id)
    assert [float(s["audio_seconds"]) for s in stats] == [2.0]


async def test_a_kind_finished_elsewhere_is_not_finished_again(
    db: Database, reads: list[str]
) -> None:
    renders: list[str] = []

    async def render(record: WorkflowRecord) -> bytes:
        renders.append(record.task_id)
        return b"{}"

    creator, other = Process(db, render_webhook=render), Process(db)
    task_id = await creator.create(Kind.SOUND)
    assert await other.workflows.apply(succeeded(task_id, Kind.SOUND))

    # The creator's memory says queued; the database says done: nothing changes.
    assert not await creator.workflows.apply(succeeded(task_id, Kind.SOUND))

    assert creator.finished == [] and len(other.finished) == 1
    assert len(renders) <= 1  # the stale copy's render, if it ran, went nowhere
    assert len(await rows(db, "SELECT * FROM app_stats WHERE task_id = $1", task_id)) == 1
    deliveries = "SELECT * FROM app_webhook_deliveries WHERE task_id = $1"
    assert len(await rows(db, deliveries, task_id)) == 1


async def test_memory_is_bounded_oldest_forgotten_first(db: Database, reads: list[str]) -> None:
    creator = Process(db, RememberedWorkflows(capacity=2))
    first, second, third = [await creator.create(Kind.SOUND) for _ in range(3)]

    for task_id in (first, second, third):
        assert await creator.workflows.apply(succeeded(task_id, Kind.SOUND))

    assert reads == [first]
    assert len(creator.finished) == 3


async def test_the_webhook_body_is_rendered_from_the_record_that_was_written(
    db: Database, reads: list[str]
) -> None:
    """Rendered while the finish is written; a render of a stale copy is dropped."""
    renders: list[WorkflowRecord] = []

    async def render(record: WorkflowRecord) -> bytes:
        renders.append(record.model_copy(deep=True))
        return record.model_dump_json().encode()

    creator, other = Process(db, render_webhook=render), Process(db)
    task_id = await creator.create(Kind.SOUND, Kind.MUSIC)
    assert await other.workflows.apply(succeeded(task_id, Kind.MUSIC))

    assert await creator.workflows.apply(succeeded(task_id, Kind.SOUND))

    # The remembered copy (music still queued) finished nothing, so rendered nothing.
    (done,) = creator.done
    assert done.body is not None
    body = json.loads(await done.body)
    assert body["status"] == "succeeded"
    assert [o["status"] for o in body["outputs"]] == ["succeeded", "succeeded"]
    assert len(renders) == 1


async def test_no_body_without_a_delivery(db: Database) -> None:
    async def render(record: WorkflowRecord) -> bytes:
        raise AssertionError("nothing to render")

    creator = Process(db, render_webhook=render, callback_url=None)
    task_id = await creator.create(Kind.SOUND)

    assert await creator.workflows.apply(succeeded(task_id, Kind.SOUND))

    (done,) = creator.done
    assert done.delivery is None and done.body is None
