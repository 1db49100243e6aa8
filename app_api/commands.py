"""``audiocraft-service app-api``: serve the App API until SIGTERM."""

from __future__ import annotations

import argparse
import logging
from typing import Any

from core_base.adapters.factory import create_database, create_kv, create_storage
from core_base.cli import tcp_port
from core_base.db.migrations import all_migrations, pending
from core_base.errors import SettingsError
from core_base.http.server import make_server, run_service, run_until_signalled
from core_base.ports.database import Database
from core_base.settings import AppSettings, load_settings

logger = logging.getLogger(__name__)

REQUIRED_SECRETS = ("marketplace_token", "internal_token", "webhook_secret")


def register(subparsers: Any) -> None:
    """Add ``app-api``."""
    parser = subparsers.add_parser(
        "app-api",
        help="run the marketplace-facing App API (APP_API_PORT, default 8007)",
        description="Serve the App API: /v1/call, /v1/result, /v1/stats, webhooks. "
        "Run `audiocraft-service migrate` first.",
    )
    parser.add_argument("--host", default="0.0.0.0", help="interface to listen on")
    parser.add_argument(
        "--port", type=tcp_port, default=None, help="overrides APP_API_PORT (0: any free port)"
    )
    parser.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    settings = load_settings(AppSettings)
    settings.require(*REQUIRED_SECRETS)
    settings.warn_about_short_secrets(*REQUIRED_SECRETS)
    port_setting = "--port" if args.port is not None else "APP_API_PORT"
    run_service(
        serve(
            settings,
            host=args.host,
            port=settings.app_api_port if args.port is None else args.port,
            port_setting=port_setting,
        )
    )
    return 0


async def serve(
    settings: AppSettings, *, host: str, port: int, port_setting: str = "APP_API_PORT"
) -> None:
    """Connect the adapters, serve until SIGTERM/SIGINT, then close them."""
    from app_api.app import create_app

    db = create_database(settings)
    kv = create_kv(settings)
    storage = create_storage(settings)
    app = create_app(settings, db=db, kv=kv, storage=storage)
    server = make_server(
        app,
        host=host,
        port=port,
        port_setting=port_setting,
        log_level=settings.log_level,
        access_log=settings.access_log,
    )
    try:
        # Before anything connects, as the other services do: a port in use is one
        # line naming it at once, not after the database and S3 have answered.
        server.bind()
        await db.connect()
        await _check_schema(db)
        # Before serving: the first webhook's presigned URLs do not wait for the
        # clients, and missing credentials, or keys or a bucket the store refuses
        # (every result URL would fail to open), stop start-up here, in one line.
        await storage.connect()
        await storage.check()
        logger.info("App API starting on %s:%d", host, port)  # uvicorn says when it listens
        await run_until_signalled([server.serve], server.stop)
    finally:
        await storage.close()
        await kv.close()
        await db.close()


async def _check_schema(db: Database) -> None:
    """Refuse to serve a database that ``migrate`` has not brought up to date: every
    call would fail, and the background loops would log a traceback a second."""
    missing = await pending(db, all_migrations())
    if missing:
        first = missing[0]
        raise SettingsError(
            f"DATABASE: {len(missing)} schema migration(s) not applied (first:"
            f" {first.component} {first.version:04d} {first.name});"
            " run `audiocraft-service migrate` first"
        )
