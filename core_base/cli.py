"""``audiocraft-service``: the one console script that starts every process.

Subcommands are contributed by small modules, each with a ``register(subparsers)``
that adds its parsers and sets ``handler`` (``args -> exit code``). A setting
error ends the process with one line naming the variable and exit code 2.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import sys
from collections.abc import Sequence

from core_base.errors import SettingsError

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
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=(args.log_level or os.environ.get("LOG_LEVEL") or "INFO").upper(),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    # Model downloads (huggingface_hub on httpx) log one INFO line per request.
    for chatty in ("httpx", "httpcore"):
        logging.getLogger(chatty).setLevel(logging.WARNING)
    try:
        code: int = args.handler(args)
    except SettingsError as exc:
        print(f"audiocraft-service: configuration error: {exc}", file=sys.stderr)
        return EXIT_SETTINGS_ERROR
    except KeyboardInterrupt:
        return 130
    return code


if __name__ == "__main__":
    sys.exit(main())
