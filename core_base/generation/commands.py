"""``audiocraft-service <service> api|worker`` for every registered service."""

from __future__ import annotations

import argparse
from typing import Any

from core_base.services import all_service_specs, spec_by_cli_name
from core_base.settings import load_settings


def register(subparsers: Any) -> None:
    for spec in all_service_specs():
        parser = subparsers.add_parser(spec.cli_name, help=f"{spec.title} service processes")
        roles = parser.add_subparsers(dest="role", required=True, metavar="ROLE")
        api = roles.add_parser(
            "api", help=f"the internal {spec.title} API (port {spec.env_prefix}PORT)"
        )
        api.add_argument("--host", default="0.0.0.0")
        api.set_defaults(handler=_run, service=spec.cli_name)
        worker = roles.add_parser(
            "worker", help=f"one {spec.title} worker (health on {spec.env_prefix}WORKER_PORT)"
        )
        worker.add_argument("--host", default="0.0.0.0", help="health/metrics bind address")
        worker.set_defaults(handler=_run, service=spec.cli_name)


def _run(args: argparse.Namespace) -> int:
    from core_base.generation.process import run_api, run_worker

    spec = spec_by_cli_name(args.service)
    settings = load_settings(spec.settings_class)
    if args.role == "api":
        return run_api(spec, settings, args.host)
    return run_worker(spec, settings, args.host)
