"""The audiocraft backend on tiny random AudioGen / MusicGen of the real architecture,
loaded from disk through ``from_settings`` and AudioCraft's own ``get_pretrained``."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from audio_gen.service import SPEC as AUDIO_SPEC
from core_base.backends.tiny_audiocraft import (
    TINY_SEGMENT_DURATION_S,
    build_tiny_audiocraft,
    offline_hub,
)
from core_base.contracts import SamplingParams
from core_base.domain import Kind
from core_base.errors import SettingsError
from core_base.generation.models import DESCRIBE_KEYS, GenerationItem, ModelAdapter
from core_base.generation.spec import ServiceSpec
from core_base.settings import Backend
from music_gen.service import SPEC as MUSIC_SPEC
from tests.models.devices import device_type, expected_device

pytestmark = pytest.mark.models


def _load(spec: ServiceSpec, root: Path, **settings: Any) -> ModelAdapter:
    adapter = spec.backends["audiocraft"](
        spec.settings_class(backend=Backend.AUDIOCRAFT, **settings), spec
    )
    with offline_hub(root):
        adapter.load()
    return adapter


@pytest.fixture(scope="session")
def audiogen(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ModelAdapter]:
    root = tmp_path_factory.mktemp("tiny-audiogen")
    model_dir = build_tiny_audiocraft(root, Kind.SOUND)
    # An absolute path in AUDIO_GEN_MODEL.
    yield _load(AUDIO_SPEC, root, model=str(model_dir))


@pytest.fixture(scope="session")
def musicgen(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ModelAdapter]:
    root = tmp_path_factory.mktemp("tiny-musicgen")
    model_dir = build_tiny_audiocraft(root, Kind.MUSIC)
    # A model id relative to AUDIOCRAFT_CACHE_DIR.
    yield _load(MUSIC_SPEC, root, model=model_dir.name, audiocraft_cache_dir=model_dir.parent)


@pytest.fixture(params=["audiogen", "musicgen"])
def adapter(request: pytest.FixtureRequest) -> ModelAdapter:
    loaded: ModelAdapter = request.getfixturevalue(request.param)
    return loaded


def test_describe_names_backend_checkpoint_device_and_licence(
    audiogen: ModelAdapter, musicgen: ModelAdapter
) -> None:
    sound, music = audiogen.describe(), musicgen.describe()
    assert (sound["family"], music["family"]) == ("AudioGen", "MusicGen")
    for facts in (sound, music):
        assert set(DESCRIBE_KEYS) <= set(facts)
        assert facts["backend"] == "audiocraft"
        assert device_type(facts["device"]) == expected_device()
        assert facts["license"] == "CC-BY-NC-4.0"
        assert str(facts["revision"]).startswith("sha256:")
        assert facts["audiocraft_version"] == "1.3.0"
        # What a generation record fills unset params with (the values used).
        assert facts["sampling_defaults"] == {
            "top_k": 250,
            "top_p": 0.0,
            "temperature": 1.0,
            "cfg_coef": 3.0,
        }
    assert sound["native_max_duration_s"] == TINY_SEGMENT_DURATION_S[Kind.SOUND]


@pytest.mark.parametrize("duration_s", [0.37, 1.0])
def test_audio_has_exact_length_and_sample_rate(adapter: ModelAdapter, duration_s: float) -> None:
    expected_rate = 16_000 if adapter.describe()["family"] == "AudioGen" else 32_000
    [audio] = adapter.generate([GenerationItem("a dog barks twice", duration_s, seed=7)])
    assert audio.sample_rate == adapter.sample_rate == expected_rate
    assert audio.samples.dtype == np.float32
    assert audio.samples.shape == (1, round(duration_s * expected_rate))
    assert np.isfinite(audio.samples).all()
    assert np.abs(audio.samples).max() <= 1.0
    assert float(np.std(audio.samples)) > 0.0


def test_same_seed_gives_the_same_audio(adapter: ModelAdapter) -> None:
    item = GenerationItem("rain on a tin roof", 0.5, seed=42)
    [first] = adapter.generate([item])
    [second] = adapter.generate([item])
    np.testing.assert_array_equal(first.samples, second.samples)


def test_seed_is_per_row_in_a_batch(adapter: ModelAdapter) -> None:
    # The item's tokens are its own, whatever its batch-mates' prompts: longer
    # ones (AudioCraft pads a batch's prompts to the longest, and its
    # cross-attention has no padding mask), shorter ones, one of equal length.
    # Only float rounding of the batched matrix products may differ.
    item = GenerationItem("a dog barks", 0.5, seed=3)
    alone = adapter.generate([item])[0]
    mates = [
        GenerationItem("a cat meows", 0.5, seed=9),
        GenerationItem("a very long description of a crowded harbour at night", 0.5, seed=9),
        GenerationItem("x", 0.5, seed=1),
    ]
    batched = adapter.generate([mates[0], item, *mates[1:]])[1]
    np.testing.assert_allclose(batched.samples, alone.samples, atol=1e-5)


def test_the_worker_batches_prompts_of_one_token_count(adapter: ModelAdapter) -> None:
    key = adapter.prompt_batch_key
    assert key("a dog barks") == key("a cat meows")
    assert key("a dog barks") != key("a very long description of a crowded harbour at night")


def test_different_prompts_or_seeds_give_different_audio(adapter: ModelAdapter) -> None:
    base, other_prompt, other_seed = adapter.generate(
        [
            GenerationItem("birds singing at dawn", 0.5, seed=11),
            GenerationItem("a jackhammer in the street", 0.5, seed=11),
            GenerationItem("birds singing at dawn", 0.5, seed=12),
        ]
    )
    assert not np.allclose(base.samples, other_prompt.samples, atol=1e-3)
    assert not np.allclose(base.samples, other_seed.samples, atol=1e-3)


def test_sampling_params_are_applied(musicgen: ModelAdapter) -> None:
    item = GenerationItem("slow piano", 0.5, seed=5)
    greedy_like = GenerationItem("slow piano", 0.5, seed=5, params=SamplingParams(top_k=1))
    default, narrowed = musicgen.generate([item, greedy_like])
    assert not np.allclose(default.samples, narrowed.samples, atol=1e-3)
    # top_k=1 leaves nothing to chance: another seed gives the same audio.
    [reseeded] = musicgen.generate(
        [GenerationItem("slow piano", 0.5, seed=6, params=SamplingParams(top_k=1))]
    )
    np.testing.assert_allclose(reseeded.samples, narrowed.samples, atol=1e-5)


def test_a_low_temperature_in_float16(tmp_path: Path) -> None:
    """On a GPU AudioCraft runs the model under float16 autocast, and divides its
    logits by the temperature after. Here the same on any device, with logits made
    large (the output layers scaled to logits of some thousands, as a high
    ``cfg_coef`` makes them): in float16, dividing by 0.01 passed 65,504, the
    probabilities turned NaN and the task failed."""
    import torch

    adapter = _load(MUSIC_SPEC, tmp_path, model=str(build_tiny_audiocraft(tmp_path, Kind.MUSIC)))
    from audiocraft.utils.autocast import TorchAutocast  # importable once audiocraft loaded

    model: Any = adapter._model  # type: ignore[attr-defined]
    model.autocast = TorchAutocast(enabled=True, device_type=model.device.type, dtype=torch.float16)
    with torch.no_grad():
        for output_layer in model.lm.linears:
            output_layer.weight.mul_(1000.0)
    low = SamplingParams(temperature=0.01)
    [audio] = adapter.generate([GenerationItem("slow piano", 0.3, seed=1, params=low)])
    assert np.isfinite(audio.samples).all()


def test_beyond_native_window_is_continued_to_exact_length(audiogen: ModelAdapter) -> None:
    duration_s = TINY_SEGMENT_DURATION_S[Kind.SOUND] + 0.83
    reports: list[tuple[int, int]] = []
    [audio] = audiogen.generate(
        [GenerationItem("waves on a beach", duration_s, seed=1)],
        progress=lambda done, total: reports.append((done, total)),
    )
    assert audio.samples.shape == (1, round(duration_s * 16_000))
    # The continued part is audio too, not padding.
    tail = audio.samples[0, -8_000:]
    assert float(np.std(tail)) > 0.0
    _assert_progress_completes(reports)


def test_progress_reaches_total(musicgen: ModelAdapter) -> None:
    reports: list[tuple[int, int]] = []
    musicgen.generate(
        [GenerationItem("drums", 0.4, seed=1), GenerationItem("bass", 0.8, seed=2)],
        progress=lambda done, total: reports.append((done, total)),
    )
    _assert_progress_completes(reports)
    # Two lengths, two decoding runs, one total: 50 frames/s plus the 3-step delay tail.
    assert reports[-1][1] == (20 + 3) + (40 + 3)


def _assert_progress_completes(reports: list[tuple[int, int]]) -> None:
    assert len(reports) > 2
    totals = {total for _, total in reports}
    assert len(totals) == 1
    done = [step for step, _ in reports]
    assert done == sorted(done)
    assert reports[-1][0] == reports[-1][1]
    assert all(step < reports[-1][1] for step in done[:-1])


def test_checkpoint_refused_by_the_safe_unpickler_still_loads(tmp_path: Path) -> None:
    # A cfg pickled as an OmegaConf object, not YAML: torch >= 2.6 refuses it by default.
    import torch
    from omegaconf import OmegaConf

    from core_base.backends.audiocraft_compat import import_audiocraft

    path = tmp_path / "state_dict.bin"
    torch.save({"best_state": {}, "xp.cfg": OmegaConf.create({"sample_rate": 16_000})}, path)
    with pytest.raises(Exception, match="Weights only load failed"):
        torch.load(path)
    loaders = import_audiocraft().loaders
    pkg = loaders.load_lm_model_ckpt(str(path))
    assert OmegaConf.create(pkg["xp.cfg"]).sample_rate == 16_000


@pytest.mark.parametrize("spec", [AUDIO_SPEC, MUSIC_SPEC], ids=["audiogen", "musicgen"])
def test_missing_model_offline_is_one_clear_settings_error(
    spec: ServiceSpec, tmp_path: Path
) -> None:
    """As on the transformers backend: one line naming the setting and download-model,
    not the hub client's LocalEntryNotFoundError (twice) and a worker crash."""
    variable = f"{spec.env_prefix}MODEL"
    with pytest.raises(SettingsError, match=rf"^{variable}: 'nosuch/model' .*download-model"):
        _load(spec, tmp_path, model="nosuch/model", audiocraft_cache_dir=tmp_path / "cache")
    with pytest.raises(SettingsError, match=rf"^{variable}: {tmp_path} holds no state_dict.bin"):
        _load(spec, tmp_path, model=str(tmp_path))


@pytest.mark.parametrize(
    ("kind", "spec", "needed"),
    [
        (Kind.SOUND, AUDIO_SPEC, "t5-large"),
        (Kind.MUSIC, MUSIC_SPEC, "t5-base, facebook/encodec_32khz"),
    ],
    ids=["audiogen", "musicgen"],
)
def test_weights_without_the_hub_parts_offline_is_one_clear_settings_error(
    kind: Kind, spec: ServiceSpec, needed: str, tmp_path: Path
) -> None:
    """The weights are in place but the T5 encoder (and MusicGen's EnCodec) that
    AudioCraft loads from the hub are not, and HF_HUB_OFFLINE is set: a line saying
    what to fetch (it was a traceback from inside AudioCraft, and exit 1)."""
    model_dir = build_tiny_audiocraft(tmp_path / "built", kind)
    variable = f"{spec.env_prefix}MODEL"
    expected = rf"^{variable}: AudioCraft also loads {needed} .*download-model"
    with pytest.raises(SettingsError, match=expected):
        _load(spec, tmp_path / "empty-hub", model=str(model_dir))
