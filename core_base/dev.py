"""``audiocraft-service dev``: the whole service in one process, no infrastructure.

The App API, both sub-service APIs and both workers run as in production and
talk to each other over HTTP and the broker; only the adapters differ: an
in-process broker, an in-memory KV store, a SQLite file and local files (served
back through signed, expiring App API URLs). Backends default to ``synth``.
"""

from __future__ import annotations

import argparse
import base64
import ipaddress
import logging
import os
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import quote

from core_base.errors import SettingsError
from core_base.http.server import ManagedServer, make_server, run_service, run_until_signalled
from core_base.ports.database import Database

if TYPE_CHECKING:
    from core_base.adapters.broker_memory import MemoryBroker
    from core_base.adapters.kv_memory import MemoryStore
    from core_base.ports.storage import ObjectStorage
    from core_base.settings import AppSettings

logger = logging.getLogger(__name__)

DEFAULT_DEV_TOKEN = "dev-marketplace-token"
DEFAULT_DEV_INTERNAL_TOKEN = "dev-internal-token"
# Standard Webhooks form (whsec_ + base64 of the key "dev-webhook-secret"): a
# verifier library given this string as it is checks dev's webhooks.
DEFAULT_DEV_WEBHOOK_SECRET = "whsec_ZGV2LXdlYmhvb2stc2VjcmV0"
DEFAULT_DATA_DIR = Path("./var/dev")


@dataclass(frozen=True)
class DevOptions:
    host: str
    data_dir: Path
    marketplace_token: str


def register(subparsers: Any) -> None:
    parser = subparsers.add_parser(
        "dev",
        help="everything in one process on embedded adapters (no external services)",
        description=(
            "The App API, both sub-service APIs and both workers in one process, on an "
            "in-process broker, an in-memory KV store, a SQLite file and local files; "
            "synth backends unless AUDIO_GEN_BACKEND / MUSIC_GEN_BACKEND say otherwise. "
            "Ports: APP_API_PORT, AUDIO_GEN_PORT, MUSIC_GEN_PORT, AUDIO_GEN_WORKER_PORT, "
            "MUSIC_GEN_WORKER_PORT."
        ),
    )
    parser.add_argument(
        "--host", default="127.0.0.1", help="bind address (default: localhost only)"
    )
    parser.add_argument(
        "--data-dir",
        type=Path,
        default=DEFAULT_DATA_DIR,
        help=f"SQLite file and audio files (default: {DEFAULT_DATA_DIR}, under this directory)",
    )
    parser.set_defaults(handler=_run)


def dev_environment(
    options: DevOptions, app_port: int, service_ports: Mapping[str, int]
) -> dict[str, str]:
    """Settings for every component of ``dev``; the user's environment wins
    except for the adapter URLs, which are what ``dev`` is about, and the
    components' addresses: they all run in this process, on the ports set.
    ``service_ports``: each generation service's API port, by env prefix."""
    data_dir = options.data_dir.resolve()
    local = local_address(options.host)
    defaults = {
        "MARKETPLACE_TOKEN": options.marketplace_token,
        "INTERNAL_TOKEN": DEFAULT_DEV_INTERNAL_TOKEN,
        "WEBHOOK_SECRET": DEFAULT_DEV_WEBHOOK_SECRET,
        # Webhook receivers on a developer's machine are local addresses.
        "ALLOW_PRIVATE_CALLBACKS": "true",
        "S3_PUBLIC_URL": f"http://{local}:{app_port}",
    }
    forced = {
        "BROKER_URL": "memory://",
        "REDIS_URL": "memory://",
        # Quoted: a "#" or "?" in the directory's name is part of the path.
        "DATABASE_URL": f"sqlite://{quote(str(data_dir / 'audiocraft.db'))}",
        "STORAGE_URL": f"file://{quote(str(data_dir / 'files'))}",
        "APP_API_URL": f"http://{local}:{app_port}",
        **{f"{prefix}API_URL": f"http://{local}:{port}" for prefix, port in service_ports.items()},
    }
    return {**defaults, **{k: v for k, v in os.environ.items() if k in defaults}, **forced}


def local_address(host: str) -> str:
    """Where this machine reaches servers bound to ``host``, for URLs: the
    loopback of an "any" address, an IPv6 address in brackets."""
    if host in ("", "0.0.0.0"):
        return "127.0.0.1"
    if host == "::":
        return "[::1]"
    return f"[{host}]" if ":" in host else host


def _run(args: argparse.Namespace) -> int:
    options = DevOptions(
        host=args.host,
        data_dir=args.data_dir,
        marketplace_token=os.environ.get("MARKETPLACE_TOKEN", DEFAULT_DEV_TOKEN),
    )
    try:
        options.data_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise SettingsError(f"--data-dir: cannot use {str(options.data_dir)!r}: {exc}") from None
    run_service(run_dev(options))
    return 0


async def run_dev(options: DevOptions) -> None:
    from core_base.adapters.broker_memory import MemoryBroker
    from core_base.adapters.factory import create_database, create_storage
    from core_base.adapters.kv_memory import MemoryStore
    from core_base.db.migrations import all_migrations, migrate
    from core_base.services import all_service_specs
    from core_base.settings import AppSettings, load_settings

    probe = load_settings(AppSettings)
    service_ports = {
        spec.env_prefix: load_settings(spec.settings_class).port for spec in all_service_specs()
    }
    os.environ.update(dev_environment(options, probe.app_api_port, service_ports))
    settings = load_settings(AppSettings)

    broker = MemoryBroker()
    kv = MemoryStore(prefix=settings.redis_key_prefix)
    db = create_database(settings)
    storage = create_storage(settings)
    try:
        await broker.connect()
        await db.connect()
        await migrate(db, all_migrations())
        await storage.ensure_bucket()
        await _requeue_what_the_last_run_held(db)
        await _serve(settings, options, broker=broker, kv=kv, db=db, storage=storage)
    finally:
        # Whatever failed: nothing left open keeps the process from ending.
        await broker.close()
        await db.close()
        await kv.close()
        await storage.close()


async def _serve(
    settings: AppSettings,
    options: DevOptions,
    *,
    broker: MemoryBroker,
    kv: MemoryStore,
    db: Database,
    storage: ObjectStorage,
) -> None:
    from app_api.app import create_app, stop_taking_calls
    from core_base.generation.api import create_generation_app
    from core_base.generation.process import create_worker_health_app
    from core_base.generation.worker import Worker
    from core_base.services import all_service_specs
    from core_base.settings import load_settings

    app_api = create_app(settings, db=db, kv=kv, storage=storage)
    servers: list[ManagedServer] = [
        make_server(
            app_api,
            host=options.host,
            port=settings.app_api_port,
            port_setting="APP_API_PORT",
            log_level="warning",
            access_log=settings.access_log,
        )
    ]
    workers: list[Worker] = []
    backends: dict[str, str] = {}
    for spec in all_service_specs():
        service_settings = load_settings(spec.settings_class)
        backends[spec.title] = service_settings.backend.value
        api = create_generation_app(
            spec, service_settings, broker=broker, kv=kv, manage_broker=False
        )
        servers.append(
            make_server(
                api,
                host=options.host,
                port=service_settings.port,
                port_setting=f"{spec.env_prefix}PORT",
                log_level="warning",
                access_log=service_settings.access_log,
            )
        )
        worker = Worker(
            spec, service_settings, broker=broker, kv=kv, storage=storage, manage_connections=False
        )
        workers.append(worker)
        servers.append(
            make_server(
                create_worker_health_app(worker),
                host=options.host,
                port=service_settings.worker_port,
                port_setting=f"{spec.env_prefix}WORKER_PORT",
                log_level="warning",
            )
        )

    async def stop() -> None:
        # Stop taking work (SPEC §6), while the workers finish theirs and report it.
        stop_taking_calls(app_api)
        for worker in workers:
            await worker.stop()
        for worker in workers:
            await worker.wait_stopped()
        for server in servers:
            await server.stop()

    _check_distinct_ports(servers)
    for server in servers:  # a port in use: one line naming it, before the banner
        server.bind()
    warn_if_exposed(settings, options.host)
    print_banner(settings, options, backends)
    await run_until_signalled(
        [*(server.serve for server in servers), *(worker.run for worker in workers)], stop
    )


def _check_distinct_ports(servers: list[ManagedServer]) -> None:
    """Two of dev's own servers on one port: both sockets bind (SO_REUSEADDR),
    and the second never serves."""
    taken: dict[int, str] = {}
    for server in servers:
        port = server.config.port
        if port in taken:
            raise SettingsError(
                f"{server.port_setting}: port {port} is {taken[port]}'s too; give each its own"
            )
        taken[port] = server.port_setting


def well_known_secrets(settings: AppSettings) -> list[str]:
    """The settings still at dev's published defaults (anyone can read them here)."""
    # MARKETPLACE_TOKEN may be a list (rotation): the default anywhere in it counts.
    in_use = ["MARKETPLACE_TOKEN"] if DEFAULT_DEV_TOKEN in settings.marketplace_tokens else []
    for name, default in (
        ("INTERNAL_TOKEN", DEFAULT_DEV_INTERNAL_TOKEN),
        ("WEBHOOK_SECRET", DEFAULT_DEV_WEBHOOK_SECRET),
    ):
        if settings.secret(name.lower()) == default:
            in_use.append(name)
    return in_use


def is_loopback(host: str) -> bool:
    if host.lower().rstrip(".") == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False  # a name: it may well be reached from elsewhere


def warn_if_exposed(settings: AppSettings, host: str) -> None:
    """dev bound beyond this machine with its published tokens: anyone who can
    reach it can make calls, forge the internal callbacks and file links, and
    (private callbacks being allowed in dev) make it post to the local network."""
    if is_loopback(host):
        return
    published = well_known_secrets(settings)
    if published:
        logger.warning(
            "dev listens on %s with the published default %s: anyone who can reach this"
            " machine can use them; set your own (environment or .env), or bind to 127.0.0.1",
            host,
            ", ".join(published[:-1]) + " and " + published[-1] if published[1:] else published[0],
        )


async def _requeue_what_the_last_run_held(db: Database) -> None:
    """The in-process broker and task store start empty: tasks that an earlier run
    on this data directory had queued or running are gone with it, and nothing
    would call back for them. Their workflows hand them on again at once."""
    from app_api.repository import requeue_unfinished

    requeued = await requeue_unfinished(db, time.time())
    if requeued:
        logger.info(
            "dev: %d unfinished task(s) of the last run handed to the sub-services again"
            " (the in-process broker keeps nothing across restarts)",
            requeued,
        )


def backends_line(backends: Mapping[str, str]) -> str:
    """Which backend each service runs, as the banner says it."""
    named = ", ".join(f"{title} {backend}" for title, backend in backends.items())
    if all(backend == "synth" for backend in backends.values()):
        return (
            f"backends: {named} (deterministic DSP, not a neural model;"
            " AUDIO_GEN_BACKEND / MUSIC_GEN_BACKEND select a model backend)"
        )
    return f"backends: {named} (calls wait in the queue while models load)"


def print_banner(settings: Any, options: DevOptions, backends: Mapping[str, str]) -> None:
    from app_api.signing import signing_key

    base = f"http://{local_address(options.host)}:{settings.app_api_port}"
    # MARKETPLACE_TOKEN may list several (rotation): the curls need one of them.
    tokens = settings.marketplace_tokens or [options.marketplace_token]
    token = tokens[0]
    listed = f"marketplace token: {token}"
    if len(tokens) > 1:
        listed = f"marketplace tokens: {', '.join(tokens)} (any one; the curls use the first)"
    # As a Standard Webhooks library takes it (a plain secret is the raw key).
    key = signing_key(settings.secret("webhook_secret"))
    signing = (
        f"webhook secret: whsec_{base64.b64encode(key).decode()}"
        " (Standard Webhooks signatures; callback_url may be a local http address)"
    )
    print(
        f"""
AudioCraft Service (dev): App API on {base}  (docs: {base}/docs)
  embedded adapters: in-process broker, in-memory KV, SQLite + files in {options.data_dir}
  {backends_line(backends)}
  {listed}
  {signing}

  curl -s -X POST {base}/v1/call -H 'Authorization: Bearer {token}' \\
       -H 'Content-Type: application/json' -d '{{"user_id":"me","prompt":"rain on a tin roof","kinds":["sound","music"]}}'
  curl -s {base}/v1/result/<task_id> -H 'Authorization: Bearer {token}'
""",
        flush=True,
    )
