"""``download-model`` fills the cache that the worker serving the model reads."""

from __future__ import annotations

import argparse
from pathlib import Path

import pytest

from core_base.backends.commands import hub_cache_for


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

    monkeypatch.setattr(model_cache, "download_snapshot", download_snapshot)
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
        ("facebook/audiogen-medium", Path("/models/audiocraft")),
        ("t5-large", hub),
    ]
    assert download("facebook/musicgen-small") == [
        ("facebook/musicgen-small", Path("/models/audiocraft")),
        ("t5-base", hub),
        ("facebook/encodec_32khz", hub),
    ]
    monkeypatch.setenv("MUSIC_GEN_BACKEND", "transformers")  # its own files suffice
    assert download("facebook/musicgen-small") == [
        ("facebook/musicgen-small", Path("/models/huggingface/hub"))
    ]
