"""The transformers MusicGen backend on a tiny random model of the real architecture.

The model is built once per session, saved to a temporary directory and loaded
through the real loading path (``from_settings`` + ``load``).
"""

from __future__ import annotations

import argparse
import dataclasses
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

# No importorskip: CI installs the model stack (scripts/install_model_backends.sh),
# and a broken install must fail here rather than skip the backend's tests.
from core_base.backends import commands
from core_base.backends.tiny import build_tiny_musicgen
from core_base.backends.transformers_backend import TransformersMusicGenAdapter, kv_cache_argument
from core_base.contracts import SamplingParams
from core_base.errors import SettingsError
from core_base.generation.models import (
    CC_BY_NC_NOTICE,
    DESCRIBE_KEYS,
    GeneratedAudio,
    GenerationItem,
)
from core_base.generation.spec import ServiceSpec
from music_gen.service import SPEC
from tests.models.devices import device_type, expected_device, expected_transformers_dtype

pytestmark = pytest.mark.models

# A short window so that a few seconds already need continuation.
TINY_WINDOW_S = 1.0
TINY_SPEC: ServiceSpec = dataclasses.replace(SPEC, native_max_duration_s=TINY_WINDOW_S)


def _adapter(model: str, *, cache_model_dir: Path | None = None) -> TransformersMusicGenAdapter:
    overrides: dict[str, Any] = {"model": model, "backend": "transformers"}
    if cache_model_dir is not None:
        overrides["cache_model_dir"] = cache_model_dir
    settings = TINY_SPEC.settings_class(**overrides)
    adapter = TransformersMusicGenAdapter.from_settings(settings, TINY_SPEC)
    adapter.load()
    return adapter


@pytest.fixture(scope="session", autouse=True)
def one_torch_thread() -> Iterator[None]:
    # The tiny model's tensors are far too small to gain from threads, and on a
    # shared 2-core machine intra-op threads spin against other processes.
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_musicgen(tmp_path_factory.mktemp("tiny-musicgen"), seed=0)


@pytest.fixture(scope="session")
def adapter(tiny_dir: Path) -> TransformersMusicGenAdapter:
    return _adapter(str(tiny_dir))


def _one(adapter: TransformersMusicGenAdapter, item: GenerationItem) -> GeneratedAudio:
    (audio,) = adapter.generate([item])
    return audio


def test_exact_duration_and_sample_rate(adapter: TransformersMusicGenAdapter) -> None:
    outputs = adapter.generate(
        [GenerationItem("drums", 1.0, seed=1), GenerationItem("piano", 0.37, seed=2)]
    )
    assert [o.sample_rate for o in outputs] == [32_000, 32_000]
    assert [o.samples.shape for o in outputs] == [(1, 32_000), (1, round(0.37 * 32_000))]
    for output in outputs:
        assert output.samples.dtype == np.float32
        assert np.isfinite(output.samples).all()
        assert np.abs(output.samples).max() <= 1.0
        assert np.abs(output.samples).max() > 0.0


@pytest.mark.parametrize("duration_s", [5e-324, 1e-6])
def test_a_tiny_duration_gives_one_sample(
    adapter: TransformersMusicGenAdapter, duration_s: float
) -> None:
    # The API accepts any positive duration; a sample is the least audio there is.
    assert _one(adapter, GenerationItem("click", duration_s, seed=1)).samples.shape == (1, 1)


def test_same_seed_same_audio_and_different_seed_different_audio(
    adapter: TransformersMusicGenAdapter,
) -> None:
    first = _one(adapter, GenerationItem("lofi beat", 0.5, seed=7))
    again = _one(adapter, GenerationItem("lofi beat", 0.5, seed=7))
    other = _one(adapter, GenerationItem("lofi beat", 0.5, seed=8))
    assert np.array_equal(first.samples, again.samples)
    assert not np.allclose(first.samples, other.samples)


def test_different_prompts_give_different_audio(adapter: TransformersMusicGenAdapter) -> None:
    rock = _one(adapter, GenerationItem("heavy rock", 0.5, seed=3))
    harp = _one(adapter, GenerationItem("gentle harp", 0.5, seed=3))
    assert not np.allclose(rock.samples, harp.samples)


def test_item_alone_equals_item_in_a_batch(adapter: TransformersMusicGenAdapter) -> None:
    item = GenerationItem("jazz trio", 0.8, seed=11)
    alone = _one(adapter, item)
    # Batch-mates of other prompts, seeds and durations (same bucket and a longer one).
    batch = adapter.generate(
        [
            GenerationItem("a much longer prompt about synthwave", 0.6, seed=1),
            item,
            GenerationItem("x", 1.9, seed=2),
        ]
    )
    assert batch[1].samples.shape == alone.samples.shape
    np.testing.assert_allclose(batch[1].samples, alone.samples, atol=1e-5)
    frames = adapter.frames_for(item.duration_s)
    codes_alone = adapter.generate_codes([item], frames)
    codes_batch = adapter.generate_codes(
        [GenerationItem("other words", 0.8, seed=5), item, GenerationItem("y", 0.8, seed=6)],
        frames,
    )
    assert codes_alone.shape == (1, 4, frames)
    assert bool((codes_batch[1] == codes_alone[0]).all())


def test_longer_than_window_is_continued_to_the_exact_length(
    adapter: TransformersMusicGenAdapter,
) -> None:
    duration_s = 2.3  # bucket 3 s: a 1 s window then continuations of 0.6 s
    steps: list[tuple[int, int]] = []
    (audio,) = adapter.generate(
        [GenerationItem("long ambient", duration_s, seed=4)],
        lambda done, total: steps.append((done, total)),
    )
    assert audio.samples.shape == (1, round(duration_s * 32_000))
    assert np.isfinite(audio.samples).all()
    frames = adapter.frames_for(duration_s)
    assert frames == 150
    # Several passes, each paying the delay pattern again.
    assert steps[-1] == (adapter.steps_for(frames), adapter.steps_for(frames))
    assert steps[-1][1] > frames + 3
    # The continuation is a real extension, not the first window repeated.
    tail = audio.samples[0, -16_000:]
    head = audio.samples[0, :16_000]
    assert not np.allclose(head, tail)


def test_progress_is_monotone_up_to_the_total(adapter: TransformersMusicGenAdapter) -> None:
    steps: list[tuple[int, int]] = []
    adapter.generate(
        [GenerationItem("a", 0.4, seed=1), GenerationItem("b", 1.5, seed=2)],
        lambda done, total: steps.append((done, total)),
    )
    dones = [done for done, _ in steps]
    totals = {total for _, total in steps}
    assert len(totals) == 1
    (total,) = totals
    assert dones == list(range(1, total + 1))
    # 0.4 s -> 1 s bucket (50 frames); 1.5 s -> 2 s bucket: two windows.
    assert total == adapter.steps_for(50) + adapter.steps_for(100)


@pytest.mark.parametrize(
    "params",
    [
        SamplingParams(temperature=0.3),
        SamplingParams(top_k=5),
        SamplingParams(top_p=0.5),
        SamplingParams(cfg_coef=1.0),
    ],
)
def test_sampling_params_change_the_output(
    adapter: TransformersMusicGenAdapter, params: SamplingParams
) -> None:
    base = _one(adapter, GenerationItem("strings", 0.5, seed=21))
    changed = _one(adapter, GenerationItem("strings", 0.5, seed=21, params=params))
    assert not np.allclose(base.samples, changed.samples)


def test_top_k_one_is_greedy_whatever_the_seed(adapter: TransformersMusicGenAdapter) -> None:
    greedy = SamplingParams(top_k=1)
    first = _one(adapter, GenerationItem("choir", 0.5, seed=1, params=greedy))
    second = _one(adapter, GenerationItem("choir", 0.5, seed=999, params=greedy))
    np.testing.assert_allclose(first.samples, second.samples, atol=1e-6)


def test_describe_names_licence_revision_and_device(
    adapter: TransformersMusicGenAdapter, tiny_dir: Path
) -> None:
    facts = adapter.describe()
    assert facts["backend"] == "transformers"
    assert set(DESCRIBE_KEYS) <= set(facts)
    assert facts["license"] == "CC-BY-NC-4.0"
    assert facts["license_notice"] == CC_BY_NC_NOTICE
    assert "CC-BY-NC 4.0" in facts["license_notice"]
    assert str(facts["revision"]).startswith("sha256:")
    assert facts["dtype"] == expected_transformers_dtype()
    assert device_type(facts["device"]) == expected_device()
    assert facts["model_id"] == str(tiny_dir)
    assert facts["window_s"] == TINY_WINDOW_S


def test_stereo_model_gives_two_channels(tmp_path: Path) -> None:
    stereo = _adapter(str(build_tiny_musicgen(tmp_path / "stereo", stereo=True, seed=1)))
    assert stereo.channels == 2
    (audio,) = stereo.generate([GenerationItem("wide pads", 1.3, seed=5)])
    assert audio.samples.shape == (2, round(1.3 * 32_000))
    assert audio.channels == 2
    assert not np.allclose(audio.samples[0], audio.samples[1])


def test_prompts_of_any_length_batch_together_on_musicgen(
    adapter: TransformersMusicGenAdapter,
) -> None:
    # Its text padding is masked everywhere (test_item_alone_equals_item_in_a_batch).
    assert adapter.prompt_batch_key("x") is None
    assert adapter.prompt_batch_key("a much longer prompt about synthwave") is None


def test_melody_model_item_alone_equals_item_in_a_batch(tmp_path: Path) -> None:
    """MusicGen-Melody puts the text before the audio in one sequence: a longer
    batch-mate's padding would shift the item's positions, so prompts of other
    token counts are generated apart (and the worker batches them apart)."""
    melody = _adapter(str(build_tiny_musicgen(tmp_path / "melody", melody=True, seed=2)))
    assert melody.describe()["melody"] is True
    short, long = "jazz trio", "a much longer prompt about synthwave"
    assert melody.prompt_batch_key(short) != melody.prompt_batch_key(long)
    assert melody.prompt_batch_key(short) == melody.prompt_batch_key("rock duo!")
    item = GenerationItem(short, 0.5, seed=11)
    alone = _one(melody, item)
    mates = [GenerationItem(long, 0.5, seed=1), GenerationItem("rock duo!", 0.5, seed=2)]
    batched = melody.generate([mates[0], item, mates[1]])[1]
    np.testing.assert_allclose(batched.samples, alone.samples, atol=1e-5)


def test_hub_id_resolves_from_the_cache_model_dir(tiny_dir: Path, tmp_path: Path) -> None:
    shutil.copytree(tiny_dir, tmp_path / "facebook--musicgen-tiny")
    adapter = _adapter("facebook/musicgen-tiny", cache_model_dir=tmp_path)
    assert adapter.describe()["revision"] == _adapter(str(tiny_dir)).describe()["revision"]
    assert adapter.generate([GenerationItem("x", 0.2, seed=1)])[0].samples.shape == (1, 6400)


@pytest.fixture
def offline(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    yield


@pytest.mark.usefixtures("offline")
def test_missing_model_offline_is_one_clear_settings_error(tmp_path: Path) -> None:
    with pytest.raises(SettingsError, match=r"^MUSIC_GEN_MODEL: .*download-model"):
        _adapter("facebook/musicgen-absent", cache_model_dir=tmp_path)


def test_build_tiny_model_command_writes_a_loadable_model(tmp_path: Path) -> None:
    parser = argparse.ArgumentParser()
    commands.register(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["build-tiny-model", str(tmp_path / "cli-tiny"), "--seed", "3"])
    assert args.handler(args) == 0
    assert (tmp_path / "cli-tiny" / "config.json").is_file()
    args = parser.parse_args(["build-tiny-model", str(tmp_path / "x"), "--kind", "sound"])
    assert args.handler(args) == 1


class _DecoderOf4x:
    def forward(self, input_ids: object, past_key_values: object = None) -> None: ...


class _DecoderOf5x:
    def forward(self, input_ids: object, cache: object = None) -> None: ...


def test_the_kv_cache_goes_by_the_name_the_installed_release_takes() -> None:
    """transformers 5 renamed the decoder's ``past_key_values`` to ``cache`` (the old
    name is removed in 5.40; pyproject's filterwarnings fails a test that uses it);
    the 4.x releases the extra allows know only the old name."""
    assert kv_cache_argument(_DecoderOf4x()) == "past_key_values"
    assert kv_cache_argument(_DecoderOf5x()) == "cache"
