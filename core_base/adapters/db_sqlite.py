"""SQLite database (aiosqlite): the embedded ``Database`` (``DATABASE_URL=sqlite:///…``).

Queries are written for PostgreSQL's ``$1, $2 ...`` placeholders; they are
translated to SQLite's numbered ``?1, ?2 ...`` (same numbers, so a parameter may
be used twice). One connection serves the process, behind an asyncio lock: SQLite
allows one writer at a time anyway, and a single connection under a lock means a
reader never sees another coroutine's uncommitted transaction. The file is in WAL
mode so that other processes (``migrate``, a second ``dev``) can read while this
one writes, and they wait for each other (busy timeout) instead of failing.
"""

from __future__ import annotations

import asyncio
import re
import sqlite3
from collections.abc import AsyncIterator, Sequence
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from functools import lru_cache
from itertools import count
from pathlib import Path
from typing import Any

import aiosqlite

from core_base.errors import SettingsError
from core_base.ports.database import Database, Row

MEMORY = ":memory:"
# How long a write waits for another process's write lock before failing.
_BUSY_TIMEOUT_MS = 10_000

# String literals, quoted identifiers and comments are copied untouched; only a
# ``$<digits>`` outside them is a placeholder.
_SQL_TOKENS = re.compile(
    r"""
    (?P<skip>'(?:[^']|'')*'|"(?:[^"]|"")*"|--[^\n]*|/\*.*?\*/)
    | \$(?P<number>[0-9]+)
    """,
    re.VERBOSE | re.DOTALL,
)


@lru_cache(maxsize=1024)
def translate_placeholders(query: str) -> str:
    """``$1, $2 ...`` (PostgreSQL) -> ``?1, ?2 ...`` (SQLite), outside literals and comments."""

    def replace(match: re.Match[str]) -> str:
        number = match.group("number")
        return match.group(0) if number is None else f"?{number}"

    return _SQL_TOKENS.sub(replace, query)


def _dict_row(cursor: sqlite3.Cursor, row: tuple[Any, ...]) -> Row:
    return {column[0]: value for column, value in zip(cursor.description, row, strict=True)}


class SqliteDatabase:
    """``Database`` on one SQLite file (or ``":memory:"``). Call :meth:`connect` before use."""

    dialect: str = "sqlite"

    def __init__(self, path: str | Path) -> None:
        self.path = str(path)
        self._connection: aiosqlite.Connection | None = None
        self._lock = asyncio.Lock()
        # The task inside ``transaction()``; it must use the transaction object.
        self._owner: asyncio.Task[Any] | None = None

    def __repr__(self) -> str:
        return f"SqliteDatabase(path={self.path!r})"

    async def connect(self) -> None:
        """Open the file (creating it and its directory); idempotent."""
        if self._connection is not None:
            return
        try:
            self._connection = await self._open()
        except (OSError, sqlite3.Error) as exc:
            # A path that cannot hold the file, or a file that is no SQLite database.
            raise SettingsError(f"DATABASE_URL: cannot open {self.path!r}: {exc}") from None

    async def _open(self) -> aiosqlite.Connection:
        if self.path != MEMORY:
            await asyncio.to_thread(Path(self.path).parent.mkdir, parents=True, exist_ok=True)
        # isolation_level=None: autocommit; transactions are opened explicitly.
        connection = await aiosqlite.connect(self.path, isolation_level=None)
        try:
            connection.row_factory = _dict_row  # type: ignore[assignment]
            await connection.execute(f"PRAGMA busy_timeout = {_BUSY_TIMEOUT_MS}")
            await connection.execute("PRAGMA journal_mode = WAL")
            # WAL makes NORMAL durable against application crashes; only a power
            # loss can lose the last transactions, which is fine for the embedded mode.
            await connection.execute("PRAGMA synchronous = NORMAL")
            await connection.execute("PRAGMA foreign_keys = ON")
        except BaseException:
            await connection.close()
            raise
        return connection

    async def close(self) -> None:
        connection, self._connection = self._connection, None
        if connection is not None:
            await connection.close()

    async def execute(self, query: str, *args: Any) -> int:
        """Run a statement; returns the number of rows it changed."""
        async with self._locked() as runner:
            return await runner.execute(query, *args)

    async def fetch(self, query: str, *args: Any) -> list[Row]:
        async with self._locked() as runner:
            return await runner.fetch(query, *args)

    async def fetchrow(self, query: str, *args: Any) -> Row | None:
        async with self._locked() as runner:
            return await runner.fetchrow(query, *args)

    async def executescript(self, statements: Sequence[str]) -> None:
        """Run DDL statements in one transaction."""
        async with self.transaction() as transaction:
            await transaction.executescript(statements)

    def transaction(self) -> AbstractAsyncContextManager[Database]:
        """A write transaction (``BEGIN IMMEDIATE``); rolled back when the block raises.

        Inside the block, use the yielded object: this database's own methods
        would wait for the transaction to end, so they raise instead.
        """
        return self._transaction()

    async def ping(self) -> bool:
        if self._connection is None:
            return False
        try:
            async with self._locked() as runner:
                await runner.fetchrow("SELECT 1")
        except (sqlite3.Error, ValueError):
            return False
        return True

    @asynccontextmanager
    async def _transaction(self) -> AsyncIterator[Database]:
        async with self._locked() as runner:
            self._owner = asyncio.current_task()
            try:
                # IMMEDIATE takes the write lock now, so two processes never both
                # read in a transaction and then fail to upgrade to a write.
                await runner.execute("BEGIN IMMEDIATE")
                try:
                    yield runner
                except BaseException:
                    # Some errors (a full disk) end the transaction themselves.
                    if runner.in_transaction:
                        await runner.execute("ROLLBACK")
                    raise
                await runner.execute("COMMIT")
            finally:
                self._owner = None

    @asynccontextmanager
    async def _locked(self) -> AsyncIterator[SqliteTransaction]:
        if self._connection is None:
            raise RuntimeError("SqliteDatabase used before connect()")
        if self._owner is not None and self._owner is asyncio.current_task():
            raise RuntimeError("inside db.transaction(), run queries on the transaction object")
        async with self._lock:
            yield SqliteTransaction(self._connection)


class SqliteTransaction:
    """The query methods of ``Database`` on the shared connection, without the lock
    (the caller holds it). ``transaction()`` here opens a savepoint."""

    dialect: str = "sqlite"
    _savepoints = count(1)

    def __init__(self, connection: aiosqlite.Connection) -> None:
        self._connection = connection

    @property
    def in_transaction(self) -> bool:
        return bool(self._connection.in_transaction)

    async def connect(self) -> None:
        """Already connected."""

    async def close(self) -> None:
        """The transaction ends with its ``async with`` block."""

    async def execute(self, query: str, *args: Any) -> int:
        async with self._connection.execute(translate_placeholders(query), args) as cursor:
            # -1 for statements that change no rows (DDL, SELECT).
            return max(cursor.rowcount, 0)

    async def fetch(self, query: str, *args: Any) -> list[Row]:
        rows = await self._connection.execute_fetchall(translate_placeholders(query), args)
        return list(rows)  # type: ignore[arg-type]  # rows are dicts (_dict_row)

    async def fetchrow(self, query: str, *args: Any) -> Row | None:
        async with self._connection.execute(translate_placeholders(query), args) as cursor:
            row: Row | None = await cursor.fetchone()  # type: ignore[assignment]
            return row

    async def executescript(self, statements: Sequence[str]) -> None:
        for statement in statements:
            await self.execute(statement)

    def transaction(self) -> AbstractAsyncContextManager[Database]:
        return self._savepoint()

    async def ping(self) -> bool:
        try:
            await self.fetchrow("SELECT 1")
        except (sqlite3.Error, ValueError):
            return False
        return True

    @asynccontextmanager
    async def _savepoint(self) -> AsyncIterator[Database]:
        name = f"sp_{next(self._savepoints)}"
        await self.execute(f"SAVEPOINT {name}")
        try:
            yield self
        except BaseException:
            await self.execute(f"ROLLBACK TO {name}")
            await self.execute(f"RELEASE {name}")
            raise
        await self.execute(f"RELEASE {name}")
