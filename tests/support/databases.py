"""Databases for tests that start the service's processes on embedded adapters."""

from __future__ import annotations

import asyncio
from pathlib import Path

from core_base.adapters.db_sqlite import SqliteDatabase
from core_base.db.migrations import all_migrations, migrate


def migrated_sqlite(path: Path) -> str:
    """A SQLite file at ``path`` with every migration applied; its DATABASE_URL."""

    async def run() -> None:
        db = SqliteDatabase(path)
        await db.connect()
        await migrate(db, all_migrations())
        await db.close()

    asyncio.run(run())
    return f"sqlite:///{path}"
