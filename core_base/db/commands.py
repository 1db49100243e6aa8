"""``audiocraft-service migrate``: create or upgrade the schema and the bucket.

Idempotent and safe to run on every deploy, from several replicas at once.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import sys
from typing import Any

from core_base.adapters.factory import create_database, create_storage
from core_base.db.migrations import Migration, all_migrations, migrate
from core_base.log_format import say
from core_base.settings import AppSettings, load_settings


def register(subparsers: Any) -> None:
    """Add the ``migrate`` subcommand."""
    parser = subparsers.add_parser(
        "migrate",
        help="create or upgrade the database schema and the storage bucket",
        description=(
            "Apply the database migrations not applied yet and create the storage "
            "bucket when missing. Idempotent."
        ),
    )
    parser.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    """Handler of ``migrate``; prints each migration it applied. Exit 1 when the
    database or the storage cannot be reached (a deploy step can retry)."""
    del args
    settings = load_settings(AppSettings)
    applied = asyncio.run(migrate_all(settings))  # the console script reports errors
    # For whoever runs it (the migrations are logged as they are applied too).
    for migration in applied:
        say(
            f"applied {migration.component} {migration.version:04d} {migration.name}",
            level=logging.INFO,
            stream=sys.stdout,
        )
    if not applied:
        say("database schema up to date", level=logging.INFO, stream=sys.stdout)
    return 0


async def migrate_all(settings: AppSettings) -> list[Migration]:
    """Run every component's migrations and ensure the bucket; returns what was applied."""
    migrations = all_migrations()
    storage = create_storage(settings)
    db = create_database(settings, unbounded_statements=True)
    await db.connect()
    try:
        applied = await migrate(db, migrations)
        await storage.ensure_bucket()
    finally:
        await db.close()
        await storage.close()
    return applied
