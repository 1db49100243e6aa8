"""The SQL database port (PostgreSQL via asyncpg, or SQLite).

Queries are written once, in the subset both engines share, with ``$1, $2 ...``
placeholders (the SQLite adapter translates them). Timestamps are stored as
epoch seconds (DOUBLE PRECISION / REAL) and JSON as TEXT, so no query depends
on an engine's types. Repositories (the SQL of one feature) sit above this port.
"""

from __future__ import annotations

from collections.abc import Sequence
from contextlib import AbstractAsyncContextManager
from typing import Any, Protocol

Row = dict[str, Any]


class Database(Protocol):
    dialect: str  # "postgresql" or "sqlite"

    async def connect(self) -> None: ...

    async def close(self) -> None: ...

    async def execute(self, query: str, *args: Any) -> int:
        """Run a statement; returns the number of rows it changed."""
        ...

    async def fetch(self, query: str, *args: Any) -> list[Row]: ...

    async def fetchrow(self, query: str, *args: Any) -> Row | None: ...

    async def executescript(self, statements: Sequence[str]) -> None:
        """Run DDL statements in one transaction."""
        ...

    def transaction(self) -> AbstractAsyncContextManager[Database]:
        """A transaction; queries on the yielded object run inside it."""
        ...

    async def ping(self) -> bool:
        """True when reachable now. Not reachable: False, or ``UnavailableError``
        saying why (the readiness probe logs it)."""
        ...
