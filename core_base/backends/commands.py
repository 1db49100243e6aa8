"""``audiocraft-service download-model`` and ``build-tiny-model``.

``download-model`` fills the model cache during an image build (the running
services then load offline); ``build-tiny-model`` writes a tiny random model of
the real architecture for tests, ``dev`` and benchmarks (SPEC §5).
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path
from typing import Any

from core_base.domain import Kind
from core_base.errors import SettingsError
from core_base.log_format import say
from core_base.settings import Backend, CoreSettings, GenerationSettings, load_settings

EXIT_FAILED = 1


def register(subparsers: Any) -> None:
    """Adds ``download-model`` and ``build-tiny-model``."""
    download = subparsers.add_parser(
        "download-model",
        help="download a hub model into the model cache (the workers' volume)",
        description="Download a Hugging Face hub model (e.g. facebook/musicgen-small) into the"
        " model cache the workers read, so that they start without the hub (HF_HUB_OFFLINE)."
        " Model weights are CC-BY-NC 4.0.",
    )
    download.add_argument("model_id", metavar="HUB_ID", help="e.g. facebook/musicgen-small")
    download.add_argument(
        "--cache-dir",
        type=Path,
        default=None,
        help="hub cache directory (default: the one the worker serving HUB_ID reads:"
        " on the audiocraft backend AUDIOCRAFT_CACHE_DIR, else the hub's own HF_HUB_CACHE;"
        " on the transformers backend TRANSFORMERS_CACHE, else CACHE_MODEL_DIR)",
    )
    download.set_defaults(handler=_download)

    tiny = subparsers.add_parser(
        "build-tiny-model",
        help="write a tiny random model of the real architecture (tests, dev)",
        description=(
            "Write a tiny randomly initialised model and print the path to set as "
            "AUDIO_GEN_MODEL / MUSIC_GEN_MODEL. With --backend audiocraft it also "
            "writes the hub models it needs under DIR/hub: run the worker with "
            "HF_HUB_CACHE=DIR/hub HF_HUB_OFFLINE=1 (printed on stderr)."
        ),
    )
    tiny.add_argument("directory", type=Path, metavar="DIR", help="where to write it")
    # A Kind, not its name: build_tiny_audiocraft tells the kinds apart by identity.
    tiny.add_argument(
        "--kind", type=Kind, choices=list(Kind), default=Kind.MUSIC, help="default: music"
    )
    tiny.add_argument("--stereo", action="store_true", help="stereo MusicGen (8 codebooks)")
    tiny.add_argument(
        "--backend",
        choices=("transformers", "audiocraft"),
        default="transformers",
        help="checkpoint layout to write",
    )
    tiny.add_argument("--seed", type=int, default=0, help="weights seed (transformers)")
    tiny.set_defaults(handler=_build_tiny)


def _download(args: argparse.Namespace) -> int:
    from core_base.backends.model_cache import download_files, download_snapshot

    cache_dir: Path = args.cache_dir or hub_cache_for(args.model_id)
    try:
        service = _audiocraft_service(args.model_id)
        if service is None:
            path = download_snapshot(args.model_id, cache_dir=cache_dir)
        else:
            from core_base.backends.audiocraft_backend import CHECKPOINT_FILES, HUB_DEPENDENCIES

            # The two files the worker reads: a hub repo may hold transformers
            # weights beside them, gigabytes this backend never reads.
            path = download_files(
                args.model_id, CHECKPOINT_FILES, cache_dir=cache_dir, library_name="audiocraft"
            )
            # And what AudioCraft loads from the hub at start, where it looks for them:
            # the hub's default cache.
            from huggingface_hub import constants

            for dependency in HUB_DEPENDENCIES[service[0]]:
                fetched = download_snapshot(dependency, cache_dir=Path(constants.HF_HUB_CACHE))
                # stderr: stdout stays the model's path alone, for scripts.
                say(f"download-model: also fetched {dependency}: {fetched}", level=logging.INFO)
    except SettingsError as exc:
        say(f"download-model: {exc}")
        return EXIT_FAILED
    print(path)
    return 0


def _audiocraft_service(model_id: str) -> tuple[Kind, GenerationSettings] | None:
    """The kind and settings of the service that serves ``model_id`` on the
    audiocraft backend, if one does."""
    from core_base.services import all_service_specs

    for spec in all_service_specs():
        settings = load_settings(spec.settings_class)
        if settings.model == model_id and settings.backend is Backend.AUDIOCRAFT:
            return spec.kind, settings
    return None


def hub_cache_for(model_id: str) -> Path:
    """The hub cache the worker serving ``model_id`` reads: AUDIOCRAFT_CACHE_DIR for
    a service on the audiocraft backend (else the hub's default cache, as that
    backend's downloads go), TRANSFORMERS_CACHE else CACHE_MODEL_DIR otherwise."""
    service = _audiocraft_service(model_id)
    if service is not None:
        settings = service[1]
        if settings.audiocraft_cache_dir is not None:
            return settings.audiocraft_cache_dir
        from huggingface_hub import constants

        return Path(constants.HF_HUB_CACHE)
    core = load_settings(CoreSettings)
    return core.transformers_cache or core.cache_model_dir


def _build_tiny(args: argparse.Namespace) -> int:
    directory: Path = args.directory
    if args.backend == "audiocraft":
        if args.stereo:
            print(
                "build-tiny-model: --stereo is not available with --backend audiocraft",
                file=sys.stderr,
            )
            return EXIT_FAILED
        from core_base.backends.tiny_audiocraft import build_tiny_audiocraft

        model = build_tiny_audiocraft(directory, args.kind)
        print(model)
        prefix = "AUDIO_GEN" if args.kind is Kind.SOUND else "MUSIC_GEN"
        say(
            f"use with: {prefix}_BACKEND=audiocraft {prefix}_MODEL={model} "
            f"HF_HUB_CACHE={directory / 'hub'} HF_HUB_OFFLINE=1",
            level=logging.INFO,
        )
        return 0
    if args.kind is not Kind.MUSIC:
        # transformers has no AudioGen class (shared/MODELS.md).
        print("build-tiny-model: --kind sound needs --backend audiocraft", file=sys.stderr)
        return EXIT_FAILED
    from core_base.backends.tiny import build_tiny_musicgen

    print(build_tiny_musicgen(directory, stereo=args.stereo, seed=args.seed))
    return 0
