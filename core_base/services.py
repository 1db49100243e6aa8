"""The registry of generation services, by marketplace kind and CLI name.

Specs are imported lazily by dotted path so that ``core_base`` never imports
its users at import time. A new service is one line here.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

from core_base.domain import Kind

if TYPE_CHECKING:
    from core_base.generation.spec import ServiceSpec

SERVICE_SPECS: dict[Kind, str] = {
    Kind.SOUND: "audio_gen.service:SPEC",
    Kind.MUSIC: "music_gen.service:SPEC",
}


def service_spec(kind: Kind) -> ServiceSpec:
    module_name, _, attribute = SERVICE_SPECS[kind].partition(":")
    spec: ServiceSpec = getattr(importlib.import_module(module_name), attribute)
    return spec


def all_service_specs() -> list[ServiceSpec]:
    return [service_spec(kind) for kind in SERVICE_SPECS]


def spec_by_cli_name(cli_name: str) -> ServiceSpec:
    for spec in all_service_specs():
        if spec.cli_name == cli_name:
            return spec
    raise KeyError(cli_name)
