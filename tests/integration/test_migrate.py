"""The migration runner and the ``migrate`` command, on PostgreSQL and SQLite."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import boto3
import pytest

from core_base.adapters.db_postgres import PostgresDatabase
from core_base.adapters.db_sqlite import SqliteDatabase
from core_base.cli import EXIT_SETTINGS_ERROR, main
from core_base.db import migrations as migrations_module
from core_base.db.migrations import Migration, all_migrations, migrate, pending
from core_base.ports.database import Database
from tests.support.infra import POSTGRES_URL, RealInfra, free_port, require_tcp

pytestmark = pytest.mark.integration

# Read by ``all_migrations`` in the tests of the ``migrate`` command.
MIGRATIONS = [
    Migration(
        "shop",
        1,
        "create orders",
        (
            "CREATE TABLE orders (id TEXT PRIMARY KEY, payload TEXT NOT NULL,"
            " created_at DOUBLE PRECISION NOT NULL)",
            "CREATE INDEX orders_created_at ON orders (created_at)",
        ),
    ),
    Migration("shop", 2, "add status", ("ALTER TABLE orders ADD COLUMN status TEXT",)),
    Migration(
        "stats",
        1,
        "create stats",
        ("CREATE TABLE stats (user_id TEXT PRIMARY KEY, calls INTEGER NOT NULL DEFAULT 0)",),
    ),
]
THIS_MODULE = f"{__name__}:MIGRATIONS"


@pytest.fixture
async def db(new_database: Database) -> AsyncIterator[Database]:
    await new_database.connect()
    yield new_database
    await new_database.close()


async def recorded(db: Database) -> list[tuple[str, int, str]]:
    rows = await db.fetch(
        "SELECT component, version, name FROM schema_migrations ORDER BY component, version"
    )
    return [(row["component"], row["version"], row["name"]) for row in rows]


async def test_pending_lists_what_migrate_would_apply(db: Database) -> None:
    """What the App API checks before it serves (PostgreSQL and SQLite)."""
    assert await pending(db, MIGRATIONS) == MIGRATIONS  # no schema_migrations table yet
    await migrate(db, MIGRATIONS[:2])
    assert await pending(db, MIGRATIONS) == MIGRATIONS[2:]
    await migrate(db, MIGRATIONS)
    assert await pending(db, MIGRATIONS[:1]) == []  # a newer release's migrations: no concern


async def test_migrate_applies_once(db: Database) -> None:
    first = await migrate(db, MIGRATIONS)
    assert first == MIGRATIONS
    second = await migrate(db, MIGRATIONS)
    assert second == []
    assert await recorded(db) == [
        ("shop", 1, "create orders"),
        ("shop", 2, "add status"),
        ("stats", 1, "create stats"),
    ]
    assert (
        await db.execute(
            "INSERT INTO orders (id, payload, created_at, status) VALUES ($1, $2, $3, $4)",
            "o1",
            "{}",
            1.5,
            "new",
        )
        == 1
    )


async def test_migrate_applies_only_new_versions_in_order(db: Database) -> None:
    assert await migrate(db, MIGRATIONS[:1]) == MIGRATIONS[:1]
    # Given out of order: still applied by version.
    shuffled = [MIGRATIONS[2], MIGRATIONS[1], MIGRATIONS[0]]
    assert await migrate(db, shuffled) == [MIGRATIONS[2], MIGRATIONS[1]]
    row = await db.fetchrow("SELECT applied_at FROM schema_migrations WHERE version = $1", 2)
    assert row is not None and row["applied_at"] > 1_600_000_000


async def test_failed_migration_leaves_nothing_behind(db: Database) -> None:
    broken = Migration(
        "shop",
        3,
        "broken",
        (
            "CREATE TABLE refunds (id TEXT PRIMARY KEY)",
            "ALTER TABLE no_such_table ADD COLUMN x TEXT",
        ),
    )
    with pytest.raises(Exception):  # noqa: B017  (each engine raises its own type)
        await migrate(db, [*MIGRATIONS, broken])
    # Applied up to the failure (components in order, each by version), then stopped.
    assert await recorded(db) == [("shop", 1, "create orders"), ("shop", 2, "add status")]
    # refunds was rolled back with the failing statement.
    await db.execute("CREATE TABLE refunds (id TEXT PRIMARY KEY)")


async def test_duplicate_versions_are_refused(db: Database) -> None:
    with pytest.raises(ValueError, match="duplicate"):
        await migrate(db, [MIGRATIONS[0], MIGRATIONS[0]])


async def test_concurrent_migrations_on_postgres(postgres_url: str) -> None:
    databases = [PostgresDatabase(postgres_url) for _ in range(3)]
    for database in databases:
        await database.connect()
    try:
        results = await asyncio.gather(*(migrate(d, MIGRATIONS) for d in databases))
        applied = [m for result in results for m in result]
        assert sorted(applied, key=lambda m: (m.component, m.version)) == MIGRATIONS
        assert len(await recorded(databases[0])) == 3
    finally:
        for database in databases:
            await database.close()


async def test_concurrent_migrations_on_one_sqlite_file(tmp_path: Path) -> None:
    databases = [SqliteDatabase(tmp_path / "shared.db") for _ in range(2)]
    for database in databases:
        await database.connect()
    try:
        results = await asyncio.gather(*(migrate(d, MIGRATIONS) for d in databases))
        assert sum(len(result) for result in results) == len(MIGRATIONS)
    finally:
        for database in databases:
            await database.close()


def test_all_migrations_loads_the_sources() -> None:
    assert all_migrations([THIS_MODULE]) == MIGRATIONS
    assert all_migrations([THIS_MODULE, THIS_MODULE.replace(":MIGRATIONS", "")]) == MIGRATIONS * 2


def test_migrate_command_on_the_real_stack(
    real_infra: RealInfra, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    for name, value in real_infra.env().items():
        monkeypatch.setenv(name, value)
    monkeypatch.setattr(migrations_module, "MIGRATION_SOURCES", (THIS_MODULE,))

    assert main(["migrate"]) == 0
    assert "applied shop 0001 create orders" in capsys.readouterr().out
    s3 = boto3.client(
        "s3",
        endpoint_url=real_infra.s3.endpoint_url,
        aws_access_key_id=real_infra.s3.access_key,
        aws_secret_access_key=real_infra.s3.secret_key,
        region_name=real_infra.s3.region,
    )
    s3.head_bucket(Bucket=real_infra.bucket)  # raises when missing

    assert main(["migrate"]) == 0
    assert "up to date" in capsys.readouterr().out


def test_migrate_command_on_embedded_adapters(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("DATABASE_URL", f"sqlite:///{tmp_path}/db/app.db")
    monkeypatch.setenv("STORAGE_URL", f"file://{tmp_path}/objects")
    monkeypatch.setattr(migrations_module, "MIGRATION_SOURCES", (THIS_MODULE,))
    monkeypatch.delenv("INTERNAL_TOKEN", raising=False)

    assert main(["migrate"]) == 2  # FileStorage signs with a key derived from it
    assert "INTERNAL_TOKEN" in capsys.readouterr().err

    monkeypatch.setenv("INTERNAL_TOKEN", "internal-token-for-tests")
    assert main(["migrate"]) == 0
    assert (tmp_path / "objects").is_dir()
    assert (tmp_path / "db" / "app.db").is_file()


def test_migrate_command_reports_an_unreachable_database(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("DATABASE_URL", f"postgresql://postgres@127.0.0.1:{free_port()}/test")
    monkeypatch.setenv("STORAGE_URL", f"file://{tmp_path}/objects")
    monkeypatch.setenv("INTERNAL_TOKEN", "internal-token-for-tests")
    monkeypatch.setattr(migrations_module, "MIGRATION_SOURCES", (THIS_MODULE,))

    assert main(["migrate"]) == 1
    assert "PostgreSQL unreachable" in capsys.readouterr().err


REPO_ROOT = Path(__file__).resolve().parents[2]
TEST_DB = urlsplit(POSTGRES_URL)


def postgres_url_with(user: str = TEST_DB.username or "postgres", db: str = TEST_DB.path) -> str:
    """The test PostgreSQL's URL with another role or database."""
    netloc = f"{user}@{TEST_DB.hostname}:{TEST_DB.port or 5432}"
    return urlunsplit(TEST_DB._replace(netloc=netloc, path=f"/{db.lstrip('/')}"))


def postgres_parts_env(tmp_path: Path, **overrides: str) -> dict[str, str]:
    """The environment of a process on the test PostgreSQL, given by its parts (no
    DATABASE_URL), run in ``tmp_path`` (no ``.env``) with this checkout's code."""
    env = {
        name: value
        for name, value in os.environ.items()
        if name != "DATABASE_URL" and not name.startswith("POSTGRES_")
    }
    return {
        **env,
        "PYTHONPATH": str(REPO_ROOT),
        "POSTGRES_HOST": TEST_DB.hostname or "127.0.0.1",
        "POSTGRES_PORT": str(TEST_DB.port or 5432),
        "POSTGRES_USER": TEST_DB.username or "postgres",
        "POSTGRES_DB": TEST_DB.path.lstrip("/"),
        "STORAGE_URL": f"file://{tmp_path}/objects",
        "INTERNAL_TOKEN": "internal-token-for-tests",
        "MARKETPLACE_TOKEN": "marketplace-token-for-tests",
        "WEBHOOK_SECRET": "webhook-secret-for-tests",
        **overrides,
    }


@pytest.mark.parametrize(
    ("overrides", "named"),
    [
        ({"POSTGRES_USER": "nosuch"}, "POSTGRES_USER, POSTGRES_PASSWORD: PostgreSQL refused"),
        ({"POSTGRES_DB": "nosuchdb"}, 'POSTGRES_DB: database "nosuchdb" does not exist'),
        ({"DATABASE_URL": postgres_url_with(user="nosuch")}, "DATABASE_URL: PostgreSQL refused"),
        ({"DATABASE_URL": postgres_url_with(db="nosuchdb")}, 'DATABASE_URL: database "nosuchdb"'),
    ],
)
@pytest.mark.parametrize("command", [["migrate"], ["app-api", "--port", "0"]])
def test_a_refused_login_or_database_names_the_setting(
    tmp_path: Path, command: list[str], overrides: dict[str, str], named: str
) -> None:
    """Not the driver's traceback and exit 1 (a retry never helps): one line naming
    what to fix, exit 2, from the real command."""
    require_tcp(POSTGRES_URL, "PostgreSQL")
    completed = subprocess.run(
        [sys.executable, "-m", "core_base.cli", *command],
        env=postgres_parts_env(tmp_path, **overrides),
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert completed.returncode == EXIT_SETTINGS_ERROR, completed.stderr
    lines = completed.stderr.strip().splitlines()
    assert len(lines) == 1, completed.stderr
    assert lines[0].startswith(f"audiocraft-service: configuration error: {named}")
