"""``audiocraft-service download-model`` and ``build-tiny-model``.

``download-model`` fills the model cache during an image build (the running
services then load offline); ``build-tiny-model`` writes a tiny random model of
the real architecture for tests, ``dev`` and benchmarks (SPEC §5).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from core_base.errors import SettingsError
from core_base.settings import CoreSettings, load_settings

EXIT_FAILED = 1


def register(subparsers: Any) -> None:
    """Adds ``download-model`` and ``build-tiny-model``."""
    download = subparsers.add_parser(
        "download-model",
        help="download a hub model into the model cache (image builds)",
        description="Download a Hugging Face hub model (e.g. facebook/musicgen-small) into the"
        " cache the services read offline. Model weights are CC-BY-NC 4.0.",
    )
    download.add_argument("model_id", metavar="HUB_ID", help="e.g. facebook/musicgen-small")
    download.add_argument(
        "--cache-dir",
        type=Path,
        default=None,
        help="hub cache directory (default: TRANSFORMERS_CACHE, else CACHE_MODEL_DIR)",
    )
    download.set_defaults(handler=_download)

    tiny = subparsers.add_parser(
        "build-tiny-model",
        help="write a tiny random model of the real architecture (tests, dev)",
    )
    tiny.add_argument("directory", type=Path, metavar="DIR")
    tiny.add_argument("--kind", choices=("music", "sound"), default="music")
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
    from core_base.backends.model_cache import download_snapshot

    cache_dir: Path | None = args.cache_dir
    if cache_dir is None:
        settings = load_settings(CoreSettings)
        cache_dir = settings.transformers_cache or settings.cache_model_dir
    try:
        path = download_snapshot(args.model_id, cache_dir=cache_dir)
    except SettingsError as exc:
        print(f"download-model: {exc}", file=sys.stderr)
        return EXIT_FAILED
    print(path)
    return 0


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

        print(build_tiny_audiocraft(directory, args.kind))
        return 0
    if args.kind != "music":
        # transformers has no AudioGen class (shared/MODELS.md).
        print("build-tiny-model: --kind sound needs --backend audiocraft", file=sys.stderr)
        return EXIT_FAILED
    from core_base.backends.tiny import build_tiny_musicgen

    print(build_tiny_musicgen(directory, stereo=args.stereo, seed=args.seed))
    return 0
