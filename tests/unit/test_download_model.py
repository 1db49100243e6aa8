"""``download-model`` fills the cache that the worker serving the model reads."""

from __future__ import annotations

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
