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
import threading
from collections.abc import Sequence
from typing import Any

from core_base.errors import ComponentFailed, SettingsError, UnavailableError
from core_base.log_format import log_formatter, say
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
EXIT_FAILED = 1

logger = logging.getLogger("audiocraft_service")


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
    # .env is read once here and again by each settings class: its warnings once.
    logging.getLogger("dotenv.main").addFilter(_OncePerMessage())
    try:
        export_library_variables()  # before any command module imports the libraries
    except SettingsError as exc:
        say(f"audiocraft-service: configuration error: {exc}")
        return EXIT_SETTINGS_ERROR
    parser = build_parser()
    args = parser.parse_args(argv)
    # "audio-gen worker", not "audio-gen": which process of the two ended.
    command = " ".join(filter(None, (args.command, getattr(args, "role", None))))
    try:
        _configure_logging(args.log_level)
        code: int = args.handler(args)
    except SettingsError as exc:
        say(f"audiocraft-service: configuration error: {exc}")
        return EXIT_SETTINGS_ERROR
    except UnavailableError as exc:
        # A dependency down at start-up: one line (it names the dependency); the
        # orchestrator restarts the process.
        say(f"audiocraft-service {command}: {exc}")
        return EXIT_UNAVAILABLE
    except KeyboardInterrupt:
        return 130
    except ComponentFailed:
        return EXIT_FAILED  # logged with its traceback as it happened
    except OSError as exc:
        # A file, a directory or a device the command could not use: the error
        # names it. The traceback is for whoever asks for it (LOG_LEVEL=DEBUG).
        logger.debug("%s failed", command, exc_info=True)
        say(f"audiocraft-service {command}: {exc}")
        return EXIT_FAILED
    except Exception:
        # A bug: its traceback, through logging (one record with LOG_FORMAT=json).
        logger.critical("%s failed", command, exc_info=True)
        return EXIT_FAILED
    return code


def tcp_port(text: str) -> int:
    """An argparse type: a TCP port number, 0 to 65535 (0: any free port)."""
    try:
        port = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a port number") from None
    if not 0 <= port <= 65535:
        raise argparse.ArgumentTypeError(f"{port} is not a port number (0-65535)")
    return port


def _log_thread_exception(args: threading.ExceptHookArgs) -> None:
    if args.exc_type is SystemExit:
        return
    thread = args.thread.name if args.thread is not None else "a thread"
    exc_info = (args.exc_type, args.exc_value, args.exc_traceback)
    logger.error("uncaught exception in %s", thread, exc_info=exc_info)  # type: ignore[arg-type]


def _log_unraisable(unraisable: Any) -> None:
    exc_info = (unraisable.exc_type, unraisable.exc_value, unraisable.exc_traceback)
    message = unraisable.err_msg or "Exception ignored in"
    logger.error("%s: %r", message, unraisable.object, exc_info=exc_info)


class _OncePerMessage(logging.Filter):
    def __init__(self) -> None:
        super().__init__()
        self._seen: set[str] = set()

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        if message in self._seen:
            return False
        self._seen.add(message)
        return True


def _configure_logging(option: str | None) -> None:
    """``--log-level``, else ``LOG_LEVEL`` from the environment or ``.env``; and
    ``LOG_FORMAT``. Python's warnings are logged too (the model libraries warn as
    they load)."""
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
    logging.captureWarnings(True)
    # What Python would print itself: an exception no thread caught, one raised
    # where it cannot propagate (a __del__, a callback). Through logging instead.
    threading.excepthook = _log_thread_exception
    sys.unraisablehook = _log_unraisable
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
