"""The ``Database`` contract, run against PostgreSQL and SQLite.

The SQL here is the subset both engines accept (see ``core_base.ports.database``):
``$n`` placeholders, epoch timestamps as DOUBLE PRECISION, JSON as TEXT.
"""

from __future__ import annotations

import asyncio
import json
import logging
import uuid
from collections.abc import AsyncIterator, Coroutine
from pathlib import Path
from typing import Any

import asyncpg
import pytest

from core_base.adapters.db_postgres import PostgresDatabase, affected_rows
from core_base.adapters.db_sqlite import SqliteDatabase, translate_placeholders
from core_base.errors import NoAnswerInTimeError, UnavailableError
from core_base.ports.database import Database
from tests.support.infra import POSTGRES_URL, free_port
from tests.support.tcp_proxy import TcpProxy

CREATE_ITEMS = """
CREATE TABLE items (
    id INTEGER PRIMARY KEY,
    name TEXT NOT NULL UNIQUE,
    note TEXT,
    payload TEXT,
    created_at DOUBLE PRECISION NOT NULL
)
"""


class Boom(Exception):
    pass


@pytest.fixture(params=["postgres", "sqlite"])
def new_database(request: pytest.FixtureRequest, tmp_path: Path) -> Database:
    """An unconnected database of one adapter (a sync fixture: ``postgres_url``
    runs its own event loop, so it cannot be set up from inside the test's)."""
    if request.param == "postgres":
        return PostgresDatabase(request.getfixturevalue("postgres_url"), max_size=4)
    return SqliteDatabase(tmp_path / "db" / "test.db")


@pytest.fixture
async def db(new_database: Database) -> AsyncIterator[Database]:
    database = new_database
    await database.connect()
    await database.execute(CREATE_ITEMS)
    yield database
    await database.close()


async def insert(db: Database, item_id: int, name: str, note: str | None = None) -> int:
    return await db.execute(
        "INSERT INTO items (id, name, note, created_at) VALUES ($1, $2, $3, $4)",
        item_id,
        name,
        note,
        1_700_000_000.25,
    )


async def names(db: Database) -> list[str]:
    return [row["name"] for row in await db.fetch("SELECT name FROM items ORDER BY id")]


async def test_rows_are_dicts_with_types_preserved(db: Database) -> None:
    payload = json.dumps({"kind": "music", "n": 2})
    await db.execute(
        "INSERT INTO items (id, name, payload, created_at) VALUES ($1, $2, $3, $4)",
        1,
        "one",
        payload,
        1_700_000_000.25,
    )
    row = await db.fetchrow(
        "SELECT id, name, note, payload, created_at FROM items WHERE id = $1", 1
    )
    assert row == {
        "id": 1,
        "name": "one",
        "note": None,
        "payload": payload,
        "created_at": 1_700_000_000.25,
    }
    assert isinstance(row["created_at"], float)
    assert await db.fetchrow("SELECT id FROM items WHERE id = $1", 99) is None
    assert await db.fetch("SELECT id FROM items WHERE id > $1", 99) == []


async def test_execute_returns_affected_rows(db: Database) -> None:
    assert await insert(db, 1, "a") == 1
    assert (
        await db.execute(
            "INSERT INTO items (id, name, created_at) VALUES ($1, $2, $5), ($3, $4, $5)",
            2,
            "b",
            3,
            "c",
            0.0,
        )
        == 2
    )
    assert await db.execute("UPDATE items SET note = $1 WHERE id >= $2", "n", 2) == 2
    assert await db.execute("UPDATE items SET note = $1 WHERE id = $2", "n", 99) == 0
    assert await db.execute("DELETE FROM items WHERE id = $1", 1) == 1
    # The shared way to insert once: a conflict changes nothing and raises nothing.
    conflict = "INSERT INTO items (id, name, created_at) VALUES ($1, $2, 0) ON CONFLICT DO NOTHING"
    assert await db.execute(conflict, 2, "b") == 0
    assert await db.execute(conflict, 4, "d") == 1
    assert await names(db) == ["b", "c", "d"]


async def test_placeholders_reordered_repeated_and_quoted(db: Database) -> None:
    await db.execute(
        "INSERT INTO items (id, name, note, created_at) VALUES ($2, $1, '$1 stays; it''s text', $3)",
        "named",
        7,
        7.0,
    )
    row = await db.fetchrow(
        'SELECT id AS "$1", name, note, created_at FROM items -- $9 in a comment\n'
        "WHERE name = $1 /* and $8 */ AND id = $2 AND note <> $1",
        "named",
        7,
    )
    assert row == {"$1": 7, "name": "named", "note": "$1 stays; it's text", "created_at": 7.0}


async def test_transaction_commits(db: Database) -> None:
    async with db.transaction() as tx:
        await insert(tx, 1, "a")
        await insert(tx, 2, "b")
        assert await tx.fetchrow("SELECT name FROM items WHERE id = $1", 2) == {"name": "b"}
    assert await names(db) == ["a", "b"]


async def test_transaction_rolls_back_on_exception(db: Database) -> None:
    await insert(db, 1, "kept")
    with pytest.raises(Boom):
        async with db.transaction() as tx:
            await insert(tx, 2, "lost")
            await tx.execute("UPDATE items SET note = $1 WHERE id = $2", "lost", 1)
            raise Boom
    assert await names(db) == ["kept"]
    assert await db.fetchrow("SELECT note FROM items WHERE id = $1", 1) == {"note": None}


async def test_transaction_rolls_back_on_a_failed_statement(db: Database) -> None:
    with pytest.raises(Exception, match=r"(?i)unique"):
        async with db.transaction() as tx:
            await insert(tx, 1, "a")
            await insert(tx, 2, "a")  # UNIQUE(name)
    assert await names(db) == []
    await insert(db, 3, "after")  # the connection is usable again
    assert await names(db) == ["after"]


async def test_nested_transaction_is_a_savepoint(db: Database) -> None:
    async with db.transaction() as tx:
        await insert(tx, 1, "outer")
        with pytest.raises(Boom):
            async with tx.transaction() as inner:
                await insert(inner, 2, "inner")
                raise Boom
        await insert(tx, 3, "after")
    assert await names(db) == ["outer", "after"]


async def test_concurrent_transactions_do_not_interleave(db: Database) -> None:
    await insert(db, 1, "counter", note="0")

    async def increment() -> None:
        async with db.transaction() as tx:
            # FOR UPDATE is PostgreSQL's; SQLite's write transaction is exclusive already.
            lock = " FOR UPDATE" if tx.dialect == "postgresql" else ""
            row = await tx.fetchrow(f"SELECT note FROM items WHERE id = $1{lock}", 1)
            assert row is not None
            await tx.execute(
                "UPDATE items SET note = $1 WHERE id = $2", str(int(row["note"]) + 1), 1
            )

    await asyncio.gather(*(increment() for _ in range(10)))
    assert await db.fetchrow("SELECT note FROM items WHERE id = $1", 1) == {"note": "10"}


async def test_executescript_is_all_or_nothing(db: Database) -> None:
    await db.executescript(
        [
            "CREATE TABLE t1 (id INTEGER PRIMARY KEY)",
            "CREATE INDEX t1_id ON t1 (id)",
        ]
    )
    assert await db.execute("INSERT INTO t1 (id) VALUES ($1)", 1) == 1
    with pytest.raises(Exception):  # noqa: B017  (each engine raises its own type)
        await db.executescript(
            ["CREATE TABLE t2 (id INTEGER PRIMARY KEY)", "CREATE TABLE t1 (id INTEGER)"]
        )
    # t2 was rolled back with the failing statement: creating it again works.
    await db.execute("CREATE TABLE t2 (id INTEGER PRIMARY KEY)")


async def test_ping_and_dialect(db: Database) -> None:
    assert await db.ping() is True
    assert db.dialect in ("postgresql", "sqlite")
    async with db.transaction() as tx:
        assert tx.dialect == db.dialect
        assert await tx.ping() is True


async def test_sqlite_in_memory() -> None:
    db = SqliteDatabase(":memory:")
    assert await db.ping() is False  # not connected yet
    await db.connect()
    await db.execute(CREATE_ITEMS)
    assert await insert(db, 1, "m") == 1
    assert await names(db) == ["m"]
    await db.close()


async def test_sqlite_refuses_the_outer_object_inside_its_transaction(tmp_path: Path) -> None:
    db = SqliteDatabase(tmp_path / "x.db")
    await db.connect()
    try:
        async with db.transaction():
            with pytest.raises(RuntimeError, match="transaction object"):
                await db.fetch("SELECT 1 AS one")
        assert await db.fetch("SELECT 1 AS one") == [{"one": 1}]
    finally:
        await db.close()


async def test_sqlite_file_is_shared_between_connections(tmp_path: Path) -> None:
    path = tmp_path / "shared.db"
    first, second = SqliteDatabase(path), SqliteDatabase(path)
    await first.connect()
    await second.connect()
    try:
        await first.execute(CREATE_ITEMS)
        assert await first.fetchrow("PRAGMA journal_mode") == {"journal_mode": "wal"}

        async def write(db: Database, start: int) -> None:
            for item_id in range(start, start + 10):
                async with db.transaction() as tx:
                    await insert(tx, item_id, f"n{item_id}")

        await asyncio.gather(write(first, 0), write(second, 100))
        assert len(await second.fetch("SELECT id FROM items")) == 20
    finally:
        await first.close()
        await second.close()


async def test_postgres_down_raises_unavailable() -> None:
    db = PostgresDatabase(f"postgresql://postgres@127.0.0.1:{free_port()}/test")
    assert await db.ping() is False
    with pytest.raises(UnavailableError):
        await db.connect()
    assert await db.ping() is False


async def test_a_statement_the_server_does_not_answer_gives_up_its_connection_at_once(
    postgres_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    """After the command timeout the connection is closed, not reset for the pool:
    a reset would wait for the silent server as long again, and the caller with it."""
    relay = TcpProxy(postgres_url, default_port=5432)
    await relay.start()
    db = PostgresDatabase(relay.url, max_size=1, command_timeout_s=0.5)
    try:
        await db.connect()
        relay.freeze()
        with caplog.at_level(logging.WARNING, logger="core_base.adapters.db_postgres"):
            with pytest.raises(NoAnswerInTimeError):
                await db.fetch("SELECT 1")
        assert "closed on release" not in caplog.text
    finally:
        relay.thaw()
        await db.close()
        await relay.stop()


async def test_work_cancelled_on_a_hung_postgres_lets_go_at_once(postgres_url: str) -> None:
    """A statement or a transaction cancelled while the server answers nothing (a
    stop's bound, a caller's timeout) ends now, not after a reset or a ROLLBACK
    that waits for the silent server (the command timeout)."""
    relay = TcpProxy(postgres_url, default_port=5432)
    await relay.start()
    db = PostgresDatabase(relay.url, max_size=2, command_timeout_s=30)
    try:
        await db.connect()
        await db.execute(CREATE_ITEMS)
        inserted = asyncio.Event()

        async def write(item_id: int) -> None:
            async with db.transaction() as tx:
                await insert(tx, item_id, f"item-{item_id}")
                inserted.set()
                await asyncio.sleep(60)  # other work, the transaction open

        writing = asyncio.create_task(write(1))  # cancelled between its statements
        await inserted.wait()
        relay.freeze()
        for task in (
            writing,
            asyncio.create_task(db.fetch("SELECT 1")),
            asyncio.create_task(write(2)),
        ):
            await asyncio.sleep(0.3)  # under way, unanswered
            task.cancel()
            done, _ = await asyncio.wait({task}, timeout=5)
            assert done, "cancelled work waited for the hung server"
    finally:
        relay.thaw()
        await db.close()
        await relay.stop()


async def test_a_statement_cancelled_on_a_healthy_postgres_is_stopped_there(
    postgres_url: str,
) -> None:
    """Cancelling a statement (a caller's timeout, a stop's bound) stops it on the
    server too: it neither runs on nor commits after its caller gave up."""
    db = PostgresDatabase(postgres_url, max_size=2)
    await db.connect()
    try:
        await db.execute("DROP TABLE IF EXISTS items")
        await db.execute(CREATE_ITEMS)
        with pytest.raises(TimeoutError):
            async with asyncio.timeout(0.3):
                await db.execute(
                    "INSERT INTO items (id, name, created_at) SELECT 1, 'late', 0"
                    " FROM pg_sleep(1.5)"
                )
        await asyncio.sleep(2.0)  # past the statement's own end
        assert await db.fetch("SELECT id FROM items") == []
        # The same statement lands when not cancelled (the test can fail).
        await db.execute("INSERT INTO items (id, name, created_at) SELECT 2, 'now', 0")
        assert await db.fetch("SELECT id FROM items") == [{"id": 2}]
    finally:
        await db.execute("DROP TABLE IF EXISTS items")
        await db.close()


async def test_a_cancelled_transaction_rolls_back_quietly(
    postgres_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    """A transaction cancelled between its statements or during one (a stop's
    bound, a caller's timeout) is rolled back on its way back to the pool, without asyncpg's error
    log of a connection "reset with an active transaction" (an alarm for whoever
    is on call, about nothing wrong); what it wrote is gone."""
    db = PostgresDatabase(postgres_url, max_size=1)
    await db.connect()
    try:
        await db.execute("DROP TABLE IF EXISTS items")
        await db.execute(CREATE_ITEMS)
        inserted = asyncio.Event()

        async def write(then: str | None) -> None:
            async with db.transaction() as tx:
                await insert(tx, 1, "abandoned")
                inserted.set()
                if then is None:
                    await asyncio.sleep(60)  # other work, between statements
                else:
                    await tx.execute(then)

        with caplog.at_level(logging.WARNING):
            for then in (None, "SELECT pg_sleep(5)"):
                inserted.clear()
                writing = asyncio.create_task(write(then))
                await inserted.wait()
                await asyncio.sleep(0.2)
                writing.cancel()
                with pytest.raises(asyncio.CancelledError):
                    await writing
                await asyncio.gather(*db._releasing)
        assert "active transaction" not in caplog.text
        assert [r for r in caplog.records if r.levelno >= logging.ERROR] == []
        assert await db.fetch("SELECT id FROM items") == []  # on the same, only connection
    finally:
        await db.execute("DROP TABLE IF EXISTS items")
        await db.close()


async def test_a_pool_closed_right_after_a_cancel_gets_its_connection_back(
    postgres_url: str,
) -> None:
    """Work cancelled, then the pool closed at once (a stop): the connection's
    release, in the background, still reaches the pool (it read the pool too late
    and failed, so closing waited out its bound, then cut the connection off)."""
    db = PostgresDatabase(postgres_url, max_size=2)
    await db.connect()
    with pytest.raises(TimeoutError):
        async with asyncio.timeout(0.2):
            await db.execute("SELECT pg_sleep(5)")
    releases = list(db._releasing)
    await db.close()
    assert releases and all(task.exception() is None for task in releases)


async def test_a_pool_closes_at_once_on_a_hung_postgres(postgres_url: str) -> None:
    """A stop closes the pool: its idle connections' goodbyes go unanswered on a
    hung server, and closing must not wait for them (it waited 10 s, then raised)."""
    relay = TcpProxy(postgres_url, default_port=5432)
    await relay.start()
    db = PostgresDatabase(relay.url, max_size=2, command_timeout_s=30)
    try:
        await db.connect()
        await db.fetch("SELECT 1")  # a connection idle in the pool
        relay.freeze()
        await asyncio.wait_for(db.close(), timeout=5)
    finally:
        relay.thaw()
        await db.close()
        await relay.stop()


async def test_a_postgres_that_stops_answering_raises_unavailable_then_recovers(
    postgres_url: str,
) -> None:
    """A server that keeps its connections open and answers nothing (hung, or cut
    off by a partition that drops packets): statements, transactions and waits for
    a pooled connection end as ``UnavailableError`` after the command timeout,
    never hang; once it answers again, so does the pool."""
    relay = TcpProxy(postgres_url, default_port=5432)
    await relay.start()
    db = PostgresDatabase(relay.url, max_size=2, command_timeout_s=0.5)
    try:
        await db.connect()
        await db.execute(CREATE_ITEMS)
        relay.freeze()

        async def write(item_id: int) -> None:
            async with db.transaction() as tx:
                await insert(tx, item_id, f"item-{item_id}")

        # Two statements hold both connections; two more wait for one.
        attempts: list[Coroutine[Any, Any, object]] = [
            db.fetch("SELECT count(*) AS n FROM items") for _ in range(2)
        ]
        attempts += [write(1), write(2)]
        outcomes = await asyncio.wait_for(
            asyncio.gather(*attempts, return_exceptions=True), timeout=15
        )
        assert all(isinstance(outcome, UnavailableError) for outcome in outcomes), outcomes

        relay.thaw()

        async def answers() -> bool:
            try:
                await write(3)
            except UnavailableError:
                await asyncio.sleep(0.1)
                return False
            return True

        deadline = asyncio.get_running_loop().time() + 15
        while not await answers():
            assert asyncio.get_running_loop().time() < deadline, "the pool did not recover"
        names = [row["name"] for row in await db.fetch("SELECT name FROM items")]
        assert "item-3" in names
    finally:
        relay.thaw()
        await db.close()
        await relay.stop()


async def test_postgres_connections_killed_mid_use_raise_unavailable(postgres_url: str) -> None:
    """The server terminating the pool's connections (a restart, a failover) while
    statements and transactions run surfaces only as ``UnavailableError`` (a 503
    to the caller, who retries), never as another error, and the pool recovers."""
    application = f"kill-{uuid.uuid4().hex[:12]}"
    db = PostgresDatabase(f"{postgres_url}&application_name={application}", max_size=8)
    await db.connect()
    await db.execute(CREATE_ITEMS)
    admin = await asyncpg.connect(POSTGRES_URL)
    unexpected: list[BaseException] = []
    unavailable = 0
    next_id = iter(range(1, 10**6))

    async def use() -> None:
        nonlocal unavailable
        for _ in range(60):
            try:
                if next(next_id) % 2:
                    await db.fetch("SELECT count(*) AS n FROM items WHERE id > $1", 0)
                else:
                    async with db.transaction() as tx:
                        await insert(tx, next(next_id), f"item-{uuid.uuid4().hex}")
            except UnavailableError:
                unavailable += 1
            except Exception as exc:
                unexpected.append(exc)
            await asyncio.sleep(0)

    async def kill() -> None:
        for _ in range(15):
            await asyncio.sleep(0.02)
            await admin.execute(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity"
                " WHERE application_name = $1",
                application,
            )

    try:
        await asyncio.gather(kill(), *(use() for _ in range(12)))
        assert unexpected == [], [repr(exc) for exc in unexpected[:5]]
        assert unavailable > 0, "the connections were never killed: the test proves nothing"
        await insert(db, 0, "after the blips")
        assert "after the blips" in await names(db)
    finally:
        await admin.close()
        await db.close()


def test_placeholder_translation() -> None:
    assert translate_placeholders("SELECT $1, $2, $10") == "SELECT ?1, ?2, ?10"
    assert translate_placeholders("x = '$1' AND y = $1") == "x = '$1' AND y = ?1"
    assert translate_placeholders("x = 'it''s $2' AND y = $2") == "x = 'it''s $2' AND y = ?2"
    assert translate_placeholders('"$1" = $1') == '"$1" = ?1'
    assert translate_placeholders("$1 -- $2\n, $3 /* $4\n */") == "?1 -- $2\n, ?3 /* $4\n */"
    assert translate_placeholders("price$") == "price$"


def test_affected_rows_parses_command_status() -> None:
    assert affected_rows("INSERT 0 3") == 3
    assert affected_rows("UPDATE 0") == 0
    assert affected_rows("DELETE 12") == 12
    assert affected_rows("CREATE TABLE") == 0
