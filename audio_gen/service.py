"""The AudioGen service: a spec on top of the generic generation service."""

from __future__ import annotations

from core_base.domain import Kind
from core_base.generation.models import lazy_adapter
from core_base.generation.spec import ServiceSpec

SPEC = ServiceSpec(
    name="audio_gen",
    cli_name="audio-gen",
    title="AudioGen",
    kind=Kind.SOUND,
    env_prefix="AUDIO_GEN_",
    default_port=8081,
    default_worker_port=9081,
    default_model="facebook/audiogen-medium",
    sample_rate=16_000,
    channels=1,
    # AudioGen was trained on 10 s clips; longer audio is continued in windows.
    native_max_duration_s=10.0,
    # transformers has no AudioGen class (see shared/MODELS.md).
    backends={
        "synth": lazy_adapter("core_base.backends.synth:SynthAdapter"),
        "audiocraft": lazy_adapter("core_base.backends.audiocraft_backend:AudioCraftAdapter"),
    },
)
