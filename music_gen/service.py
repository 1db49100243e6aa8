"""The MusicGen service: a spec on top of the generic generation service."""

from __future__ import annotations

from core_base.domain import Kind
from core_base.generation.models import lazy_adapter
from core_base.generation.spec import ServiceSpec

SPEC = ServiceSpec(
    name="music_gen",
    cli_name="music-gen",
    title="MusicGen",
    kind=Kind.MUSIC,
    env_prefix="MUSIC_GEN_",
    default_port=8082,
    default_worker_port=9082,
    default_model="facebook/musicgen-small",
    sample_rate=32_000,
    channels=1,
    # MusicGen was trained on 30 s clips; longer audio is continued in windows.
    native_max_duration_s=30.0,
    backends={
        "synth": lazy_adapter("core_base.backends.synth:SynthAdapter"),
        "transformers": lazy_adapter(
            "core_base.backends.transformers_backend:TransformersMusicGenAdapter"
        ),
        "audiocraft": lazy_adapter("core_base.backends.audiocraft_backend:AudioCraftAdapter"),
    },
)
