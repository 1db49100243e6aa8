"""What distinguishes one generation service from another: a ``ServiceSpec``.

``audio_gen`` and ``music_gen`` each declare one; everything else is generic.
Adding a service (say, speech) is a new package with a spec and an adapter.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from core_base.constants import QUEUE_DELIVERY_LIMIT
from core_base.domain import Kind
from core_base.generation.models import AdapterFactory
from core_base.ports.broker import QueueSpec
from core_base.settings import GenerationSettings, generation_settings_class


@dataclass(frozen=True)
class ServiceSpec:
    name: str  # "audio_gen": queue and metric names
    cli_name: str  # "audio-gen": the console script's subcommand
    title: str  # "AudioGen": OpenAPI title and logs
    kind: Kind  # what the marketplace calls it
    env_prefix: str  # "AUDIO_GEN_": AUDIO_GEN_PORT, AUDIO_GEN_MODEL, ...
    default_port: int
    default_worker_port: int
    default_model: str
    sample_rate: int  # of the real model; synth matches it
    channels: int
    native_max_duration_s: float  # longer audio is made in windows
    backends: Mapping[str, AdapterFactory]  # Backend value -> factory

    @property
    def settings_class(self) -> type[GenerationSettings]:
        return generation_settings_class(
            self.env_prefix, self.default_port, self.default_worker_port, self.default_model
        )

    def queue(self, settings: GenerationSettings) -> QueueSpec:
        return QueueSpec(
            name=f"{settings.queue_prefix}{self.name}.tasks", delivery_limit=QUEUE_DELIVERY_LIMIT
        )
