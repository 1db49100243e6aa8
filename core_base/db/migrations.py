"""Schema migrations: numbered lists of SQL statements per component.

Each component (``app_api``, ...) owns a list of :class:`Migration`; ``migrate``
applies those not yet recorded in ``schema_migrations``, each in a transaction
of its own together with its record, so a failed migration leaves nothing
behind. It is idempotent and safe when several processes run it at once: on
PostgreSQL every step holds a transaction-scoped advisory lock; on SQLite the
write transaction itself serialises them. Statements must be in the SQL subset
both engines accept (see ``core_base.ports.database``).
"""

from __future__ import annotations

import importlib
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass

from core_base.ports.database import Database

logger = logging.getLogger(__name__)

# ``module:attribute`` of every component's migration list, applied in this order.
MIGRATION_SOURCES: tuple[str, ...] = ("app_api.migrations:MIGRATIONS",)

# Key of the advisory lock that serialises migrations on PostgreSQL (any
# constant works; this one is the ASCII of "audiocra").
ADVISORY_LOCK_KEY = 0x6175_6469_6F63_7261

_CREATE_TABLE = """
CREATE TABLE IF NOT EXISTS schema_migrations (
    component TEXT NOT NULL,
    version INTEGER NOT NULL,
    name TEXT NOT NULL,
    applied_at DOUBLE PRECISION NOT NULL,
    PRIMARY KEY (component, version)
)
"""


@dataclass(frozen=True)
class Migration:
    """One schema change of one component; ``version`` counts up from 1."""

    component: str
    version: int
    name: str
    statements: tuple[str, ...]


async def migrate(db: Database, migrations: Sequence[Migration]) -> list[Migration]:
    """Apply the migrations not applied yet, in order; returns those applied now."""
    ordered = _ordered(migrations)
    async with db.transaction() as transaction:
        await _lock(transaction)
        await transaction.execute(_CREATE_TABLE)
    applied: list[Migration] = []
    for migration in ordered:
        async with db.transaction() as transaction:
            await _lock(transaction)
            # Checked under the lock: another process may have applied it meanwhile.
            done = await transaction.fetchrow(
                "SELECT 1 AS done FROM schema_migrations WHERE component = $1 AND version = $2",
                migration.component,
                migration.version,
            )
            if done is not None:
                continue
            await transaction.executescript(migration.statements)
            await transaction.execute(
                "INSERT INTO schema_migrations (component, version, name, applied_at)"
                " VALUES ($1, $2, $3, $4)",
                migration.component,
                migration.version,
                migration.name,
                time.time(),
            )
        logger.info(
            "applied migration %s %04d %s", migration.component, migration.version, migration.name
        )
        applied.append(migration)
    return applied


async def pending(db: Database, migrations: Sequence[Migration]) -> list[Migration]:
    """The migrations not applied yet, in order (all of them on an empty database).
    Applied ones this release does not know (a newer release's) are no concern."""
    if db.dialect == "postgresql":
        row = await db.fetchrow("SELECT to_regclass('schema_migrations') IS NOT NULL AS present")
    else:
        row = await db.fetchrow(
            "SELECT COUNT(*) > 0 AS present FROM sqlite_master"
            " WHERE type = 'table' AND name = 'schema_migrations'"
        )
    applied: set[tuple[str, int]] = set()
    if row is not None and row["present"]:
        rows = await db.fetch("SELECT component, version FROM schema_migrations")
        applied = {(str(r["component"]), int(r["version"])) for r in rows}
    return [m for m in _ordered(migrations) if (m.component, m.version) not in applied]


def all_migrations(sources: Sequence[str] | None = None) -> list[Migration]:
    """The migrations of every component, loaded from ``module:attribute`` paths
    (default: :data:`MIGRATION_SOURCES`)."""
    migrations: list[Migration] = []
    for source in MIGRATION_SOURCES if sources is None else sources:
        module_name, _, attribute = source.partition(":")
        module = importlib.import_module(module_name)
        migrations.extend(getattr(module, attribute or "MIGRATIONS"))
    return migrations


async def _lock(transaction: Database) -> None:
    if transaction.dialect == "postgresql":
        await transaction.execute("SELECT pg_advisory_xact_lock($1)", ADVISORY_LOCK_KEY)


def _ordered(migrations: Sequence[Migration]) -> list[Migration]:
    """Components in order of first appearance, each by version; refuses duplicates."""
    first_seen: dict[str, int] = {}
    seen: set[tuple[str, int]] = set()
    for migration in migrations:
        first_seen.setdefault(migration.component, len(first_seen))
        identity = (migration.component, migration.version)
        if identity in seen:
            raise ValueError(f"duplicate migration {migration.component} {migration.version}")
        if migration.version < 1:
            raise ValueError(f"migration {migration.component} {migration.version}: version < 1")
        seen.add(identity)
    return sorted(migrations, key=lambda m: (first_seen[m.component], m.version))
