"""``audiocraft-service``: the one console script that starts every process.

Subcommands are contributed by small modules, each with a ``register(subparsers)``
that adds its parsers and sets ``handler`` (``args -> exit code``). A setting
error ends the process with one line naming the variable and exit code 2; a
dependency unreachable at start-up, with one line naming it and exit code 1.
"""

from __future__ import annotations

import argparse
import asyncio
import importlib
import logging
import sys
from collections.abc import Sequence

from core_base.errors import SettingsError, UnavailableError
from core_base.log_format import log_formatter
from core_base.settings import (
    LoggingSettings,
    export_library_variables,
    load_settings,
    log_level_name,
)

# Modules that contribute subcommands, in --help order.
COMMAND_MODULES: tuple[str, ...] = (
    "app_api.commands",  # app-api
    "core_base.generation.commands",  # audio-gen api|worker, music-gen api|worker
    "core_base.dev",  # dev
    "core_base.db.commands",  # migrate
    "core_base.audio.commands",  # generate
    "core_base.backends.commands",  # download-model, build-tiny-model
)

EXIT_SETTINGS_ERROR = 2
EXIT_UNAVAILABLE = 1


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="audiocraft-service",
        description="AudioCraft Service: text-to-audio (AudioGen, MusicGen) for an AI marketplace.",
    )
    parser.add_argument("--log-level", default=None, help="overrides LOG_LEVEL")
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for module_name in COMMAND_MODULES:
        importlib.import_module(module_name).register(subparsers)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    export_library_variables()  # before any command module imports the libraries
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        _configure_logging(args.log_level)
        code: int = args.handler(args)
    except SettingsError as exc:
        print(f"audiocraft-service: configuration error: {exc}", file=sys.stderr)
        return EXIT_SETTINGS_ERROR
    except UnavailableError as exc:
        # A dependency down at start-up: one line (it names the dependency); the
        # orchestrator restarts the process.
        print(f"audiocraft-service {args.command}: {exc}", file=sys.stderr)
        return EXIT_UNAVAILABLE
    except KeyboardInterrupt:
        return 130
    return code


def _configure_logging(option: str | None) -> None:
    """``--log-level``, else ``LOG_LEVEL`` from the environment or ``.env``; and
    ``LOG_FORMAT``."""
    overrides = {}
    if option is not None:
        try:
            overrides["log_level"] = log_level_name(option)
        except ValueError as exc:
            raise SettingsError(f"--log-level: {exc}") from None
    settings = load_settings(LoggingSettings, **overrides)
    handler = logging.StreamHandler()
    handler.setFormatter(log_formatter(settings.log_format))
    logging.basicConfig(level=settings.log_level, handlers=[handler])
    # Model downloads (huggingface_hub on httpx, or httpx2 from its 2.x) log one
    # INFO line per request.
    for chatty in ("httpx", "httpcore", "httpx2", "httpcore2"):
        logging.getLogger(chatty).setLevel(logging.WARNING)
    # aio-pika and aiormq log every reconnect attempt (one a second while RabbitMQ
    # is down), and a connection RabbitMQ closes (a restart, an operator) as errors
    # with a traceback; the broker adapter reports the outage itself, with the
    # reason, once and every 30 s, and the reconnection.
    logging.getLogger("aio_pika.robust_connection").setLevel(logging.ERROR)
    logging.getLogger("aiormq.connection").addFilter(_not_reported_by_the_broker_adapter)
    logging.getLogger("aio_pika.tools").addFilter(_not_a_closed_channel_callback)
    logging.getLogger("asyncpg.pool").addFilter(_pool_refill_in_one_line)


# AMQP's reply code for a connection the broker closes on purpose (a restart, an
# operator); other codes are the broker reporting a fault of ours: those stay.
_CONNECTION_FORCED = 320


def _not_reported_by_the_broker_adapter(record: logging.LogRecord) -> bool:
    message = str(record.msg)
    args = record.args if isinstance(record.args, tuple) else ()
    if message.startswith("error when creating transport"):
        return False
    if message.startswith("Unexpected connection close"):  # args: connection, code, text
        return not (len(args) > 1 and args[1] == _CONNECTION_FORCED)
    if message.startswith("Cancelling cause reader exited abnormally"):
        # Only for that close, or the connection dropped under it (the broker gone,
        # the network cut): another cause (a malformed frame, a close for a fault
        # of ours) is news.
        from aiormq.exceptions import ConnectionClosed

        failure = record.exc_info[1] if record.exc_info else None
        if isinstance(failure, ConnectionClosed):
            return failure.args[:1] != (_CONNECTION_FORCED,)
        return not isinstance(failure, (ConnectionError, asyncio.IncompleteReadError))
    return True


def _pool_refill_in_one_line(record: logging.LogRecord) -> bool:
    """asyncpg keeps refilling its pool while PostgreSQL is down (waits doubling to
    a minute), logging each refused connection with a traceback; its cause is all
    there is to read, in one line (the services report the outage themselves)."""
    failure = record.exc_info[1] if record.exc_info else None
    if failure is not None and str(record.msg).startswith("Failed to restore the pool"):
        record.msg = f"{record.msg} ({type(failure).__name__}: {failure})"
        record.exc_info = record.exc_text = None
    return True


def _not_a_closed_channel_callback(record: logging.LogRecord) -> bool:
    """aio-pika's channels, told their connection closed, fail to close themselves
    on it ("Callback <... RobustChannel._on_close ...> error: ... closed" or "No
    active transport"); they are restored with the connection. A restore that
    fails otherwise (the broker refusing a declare) stays in the log."""
    args = record.args if isinstance(record.args, tuple) else ()
    if len(args) < 3 or "RobustChannel._on_close" not in repr(args[0]):
        return True
    from aiormq.exceptions import ChannelInvalidStateError

    failure = args[2]
    on_a_closed_connection = isinstance(failure, ChannelInvalidStateError) or (
        isinstance(failure, RuntimeError) and str(failure).endswith(" closed")
    )
    return not on_a_closed_connection


if __name__ == "__main__":
    sys.exit(main())
