"""Fixtures of the App API unit tests: embedded adapters (SQLite, memory, files)."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from app_api.migrations import MIGRATIONS
from core_base.adapters.db_sqlite import MEMORY, SqliteDatabase
from core_base.adapters.kv_memory import MemoryStore
from core_base.adapters.storage_files import FileStorage
from core_base.db.migrations import migrate
from tests.app_api.support import FakeSubService, Receiver, serve


@pytest.fixture
async def db() -> AsyncIterator[SqliteDatabase]:
    database = SqliteDatabase(MEMORY)
    await database.connect()
    await migrate(database, MIGRATIONS)
    yield database
    await database.close()


@pytest.fixture
def kv() -> MemoryStore:
    return MemoryStore(prefix="test:")


@pytest.fixture
async def storage(tmp_path: Path) -> FileStorage:
    files = FileStorage(
        tmp_path / "files", public_base_url="http://app.test", signing_secret="s3cr3t"
    )
    await files.ensure_bucket()
    return files


@pytest.fixture
async def subservice() -> AsyncIterator[tuple[FakeSubService, str]]:
    fake = FakeSubService()
    async with serve(fake.app()) as url:
        yield fake, url


@pytest.fixture
async def receiver() -> AsyncIterator[tuple[Receiver, str]]:
    fake = Receiver()
    async with serve(fake.app()) as url:
        yield fake, f"{url}/hook"
