"""``download-model`` fills the cache that the worker serving the model reads."""

from __future__ import annotations

import argparse
import logging
import os
import socket
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path

import pytest

from core_base.backends.commands import hub_cache_for
from core_base.errors import SettingsError
from core_base.settings import LIBRARY_VARIABLES


@pytest.fixture(autouse=True)
def environment(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.chdir(tmp_path)  # no .env of the checkout
    for name in ("AUDIO_GEN_MODEL", "MUSIC_GEN_MODEL", "AUDIO_GEN_BACKEND", "MUSIC_GEN_BACKEND"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("CACHE_MODEL_DIR", "/models")
    monkeypatch.setenv("TRANSFORMERS_CACHE", "/models/huggingface/hub")
    monkeypatch.setenv("AUDIOCRAFT_CACHE_DIR", "/models/audiocraft")


def test_a_model_served_on_the_audiocraft_backend_goes_to_its_cache(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("AUDIO_GEN_BACKEND", "audiocraft")
    assert hub_cache_for("facebook/audiogen-medium") == Path("/models/audiocraft")


def test_a_model_served_on_transformers_or_by_no_service_goes_to_the_hub_cache(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("AUDIO_GEN_BACKEND", "audiocraft")
    monkeypatch.setenv("MUSIC_GEN_BACKEND", "transformers")
    assert hub_cache_for("facebook/musicgen-small") == Path("/models/huggingface/hub")
    assert hub_cache_for("facebook/musicgen-large") == Path("/models/huggingface/hub")
    monkeypatch.delenv("TRANSFORMERS_CACHE")
    assert hub_cache_for("facebook/musicgen-small") == Path("/models")


def test_audiocraft_models_come_with_what_audiocraft_loads_from_the_hub(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Weights alone are not enough offline: AudioCraft also loads the T5 encoder
    (and MusicGen's EnCodec) from the hub's default cache. The hub itself cannot
    be reached here: the downloads are recorded instead."""
    from huggingface_hub import constants

    # Imported before the stand-in replaces download_snapshot: a first import here
    # would bind the stand-in for the rest of the session (later tests saw it).
    from core_base.backends import audiocraft_backend, commands, model_cache  # noqa: F401

    fetched: list[tuple[str, Path]] = []

    def download_snapshot(model_id: str, *, cache_dir: Path) -> Path:
        fetched.append((model_id, cache_dir))
        return cache_dir / model_id

    def download_files(
        model_id: str, files: Sequence[str], *, cache_dir: Path, library_name: str
    ) -> Path:
        assert tuple(files) == ("state_dict.bin", "compression_state_dict.bin")
        assert library_name == "audiocraft"
        fetched.append((f"{model_id} checkpoint", cache_dir))
        return cache_dir / model_id

    monkeypatch.setattr(model_cache, "download_snapshot", download_snapshot)
    monkeypatch.setattr(model_cache, "download_files", download_files)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setenv("AUDIO_GEN_BACKEND", "audiocraft")
    monkeypatch.setenv("MUSIC_GEN_BACKEND", "audiocraft")

    def download(model_id: str) -> list[tuple[str, Path]]:
        fetched.clear()
        parser = argparse.ArgumentParser()
        commands.register(parser.add_subparsers(dest="command"))
        args = parser.parse_args(["download-model", model_id])
        assert args.handler(args) == 0
        return list(fetched)

    hub = tmp_path / "hub"
    assert download("facebook/audiogen-medium") == [
        ("facebook/audiogen-medium checkpoint", Path("/models/audiocraft")),
        ("t5-large", hub),
    ]
    assert download("facebook/musicgen-small") == [
        ("facebook/musicgen-small checkpoint", Path("/models/audiocraft")),
        ("t5-base", hub),
        ("facebook/encodec_32khz", hub),
    ]
    monkeypatch.setenv("MUSIC_GEN_BACKEND", "transformers")  # its own files suffice
    assert download("facebook/musicgen-small") == [
        ("facebook/musicgen-small", Path("/models/huggingface/hub"))
    ]


# Hub listings (``HfApi().list_repo_files``) of the repos the services use.
MUSICGEN_SMALL_FILES = [
    ".gitattributes", "README.md", "compression_state_dict.bin", "config.json",
    "generation_config.json", "model.safetensors", "preprocessor_config.json",
    "pytorch_model.bin", "special_tokens_map.json", "spiece.model", "state_dict.bin",
    "tokenizer.json", "tokenizer_config.json",
]  # fmt: skip
T5_BASE_FILES = [
    ".gitattributes", "README.md", "config.json", "flax_model.msgpack",
    "generation_config.json", "model.safetensors", "onnx/decoder_model.onnx",
    "onnx/encoder_model.onnx", "pytorch_model.bin", "rust_model.ot", "spiece.model",
    "tf_model.h5", "tokenizer.json",
]  # fmt: skip
SHARDED_FILES = [
    "config.json", "model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors",
    "model.safetensors.index.json", "pytorch_model-00001-of-00002.bin",
    "pytorch_model-00002-of-00002.bin", "pytorch_model.bin.index.json", "state_dict.bin",
]  # fmt: skip
AUDIOGEN_MEDIUM_FILES = [
    ".gitattributes", "README.md", "compression_state_dict.bin", "state_dict.bin"
]  # fmt: skip


@pytest.mark.parametrize(
    ("listing", "fetched"),
    [
        (
            MUSICGEN_SMALL_FILES,
            {
                ".gitattributes", "README.md", "config.json", "generation_config.json",
                "model.safetensors", "preprocessor_config.json", "special_tokens_map.json",
                "spiece.model", "tokenizer.json", "tokenizer_config.json",
            },
        ),
        (
            T5_BASE_FILES,
            {
                ".gitattributes", "README.md", "config.json", "generation_config.json",
                "model.safetensors", "spiece.model", "tokenizer.json",
            },
        ),
        (
            SHARDED_FILES,
            {
                "config.json", "model-00001-of-00002.safetensors",
                "model-00002-of-00002.safetensors", "model.safetensors.index.json",
            },
        ),
        # No safetensors: the .bin are the weights.
        (AUDIOGEN_MEDIUM_FILES, set(AUDIOGEN_MEDIUM_FILES)),
    ],
    ids=["musicgen-small", "t5-base", "sharded", "bin-only"],
)  # fmt: skip
def test_a_snapshot_fetches_one_copy_of_the_weights(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, listing: list[str], fetched: set[str]
) -> None:
    """Repos that hold safetensors often hold the same weights as .bin too, and
    facebook/musicgen-* AudioCraft's checkpoint beside them: gigabytes that
    transformers never reads. The listing is the hub's answer; which files the
    patterns leave is decided by huggingface_hub's own filter, as
    ``snapshot_download`` applies it."""
    from core_base.backends.model_cache import download_snapshot

    downloaded = _hub_standing_in(monkeypatch, listing)
    assert download_snapshot("org/model", cache_dir=tmp_path) == tmp_path / "snapshots" / "abc"
    assert downloaded == fetched


def test_offline_a_snapshot_comes_from_the_cache_without_asking_the_hub(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """With HF_HUB_OFFLINE set (as DEPLOY advises once the weights are in), the
    listing of the repo's files is not asked for: snapshot_download serves the
    cache."""
    from core_base.backends.model_cache import download_snapshot

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    _hub_standing_in(monkeypatch, None)
    assert download_snapshot("org/model", cache_dir=tmp_path) == tmp_path / "snapshots" / "abc"


def test_an_unreachable_hub_is_one_line_naming_the_setting(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """The hub's address refuses connections (an outage, no route, a firewall):
    the hub client's own error (no hub error: its HTTP library's) becomes the
    one-line configuration error, not a traceback (the worker restarting on it)."""
    import huggingface_hub.constants
    import huggingface_hub.utils._http

    from core_base.backends.model_cache import resolve_model_source

    with socket.socket() as probe:  # a port nothing listens on
        probe.bind(("127.0.0.1", 0))
        refused = probe.getsockname()[1]
    monkeypatch.setattr(huggingface_hub.constants, "ENDPOINT", f"http://127.0.0.1:{refused}")
    # The client retries a refused connection with backoff (~23 s): same failure, no wait.
    backoff_clock = huggingface_hub.utils._http.time  # type: ignore[attr-defined]
    monkeypatch.setattr(backoff_clock, "sleep", lambda _s: None)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)

    with pytest.raises(SettingsError) as failure:
        resolve_model_source(
            "org/model",
            cache_model_dir=tmp_path / "models",
            hub_cache_dir=tmp_path / "hub",
            variable="MUSIC_GEN_MODEL",
        )

    message = str(failure.value)
    assert message.startswith("MUSIC_GEN_MODEL: cannot get 'org/model' from the hub")
    assert "download-model org/model" in message and "\n" not in message
    # The client's retry warnings, once each, through the root logger's handlers.
    hub_logger = logging.getLogger("huggingface_hub")
    assert not [h for h in hub_logger.handlers if type(h) is logging.StreamHandler]
    assert hub_logger.propagate


def test_hf_hub_offline_in_dotenv_keeps_the_cli_off_the_hub(tmp_path: Path) -> None:
    """Outside compose the processes read .env: HF_HUB_OFFLINE there must reach
    huggingface_hub (it reads the process environment, as it is imported). The
    hub's address refuses connections, so a process that tried it would say so."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        refused = probe.getsockname()[1]
    (tmp_path / ".env").write_text(
        f"HF_HUB_OFFLINE=1\nHF_ENDPOINT=http://127.0.0.1:{refused}\nLOG_LEVEL=WARNING\n"
    )
    env = {k: v for k, v in os.environ.items() if k not in LIBRARY_VARIABLES}

    done = subprocess.run(
        [sys.executable, "-m", "core_base.cli", "download-model", "org/model"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )

    assert done.returncode != 0
    assert "cannot get 'org/model'" in done.stderr
    assert "LocalEntryNotFoundError" in done.stderr, "not served from the cache alone"
    assert "Connection refused" not in done.stderr and "ConnectError" not in done.stderr


def test_the_cli_parses_its_commands_without_importing_a_model_library() -> None:
    """The libraries read some variables as they are imported (huggingface_hub's
    HF_HUB_OFFLINE and HF_ENDPOINT): .env's are exported first, which is in time
    only while nothing before a command's handler imports them."""
    probe = (
        "import sys; from core_base import cli; cli.build_parser();"
        " print(sorted(m for m in ('huggingface_hub', 'torch', 'transformers', 'audiocraft')"
        " if m in sys.modules))"
    )

    done = subprocess.run(
        [sys.executable, "-c", probe], capture_output=True, text=True, timeout=60, check=True
    )

    assert done.stdout.strip() == "[]", done.stdout


def _hub_standing_in(monkeypatch: pytest.MonkeyPatch, listing: list[str] | None) -> set[str]:
    """The hub cannot be reached here: ``HfApi().list_repo_files`` answers
    ``listing`` (None: refuses, as offline), and ``snapshot_download`` fetches what
    huggingface_hub's own filter leaves of it, into the set returned."""
    import huggingface_hub
    from huggingface_hub.utils._paths import filter_repo_objects

    downloaded: set[str] = set()

    def snapshot_download(
        model_id: str, *, cache_dir: Path, local_files_only: bool, ignore_patterns: list[str]
    ) -> str:
        downloaded.update(filter_repo_objects(listing or [], ignore_patterns=ignore_patterns))
        return str(cache_dir / "snapshots" / "abc")

    class HfApi:
        def list_repo_files(self, model_id: str) -> list[str]:
            if listing is None:
                raise huggingface_hub.errors.OfflineModeIsEnabled("offline")
            return listing

    monkeypatch.setattr(huggingface_hub, "snapshot_download", snapshot_download)
    monkeypatch.setattr(huggingface_hub, "HfApi", HfApi)
    return downloaded
