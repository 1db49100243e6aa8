"""The synth backend (core_base.backends.synth): exact, deterministic, audible,
prompt-dependent audio, and the step cadence the worker and benchmarks rely on."""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from itertools import pairwise
from pathlib import Path

import numpy as np
import numpy.typing as npt
import pytest

from core_base.audio.encoding import decode, encode
from core_base.backends.synth import SynthAdapter
from core_base.backends.synth import adapter as synth_adapter
from core_base.contracts import SamplingParams
from core_base.domain import AudioFormat, Kind
from core_base.generation.models import DESCRIBE_KEYS, GenerationItem, ModelAdapter
from core_base.services import service_spec
from core_base.settings import load_settings

PROMPTS = (
    "a dog barking",
    "rain on a tin roof",
    "strong wind in the trees",
    "a cat meowing on a rainy street",
    "birds chirping at dawn",
    "crackling campfire",
    "thunder in the distance",
    "lo-fi piano with soft drums",
    "upbeat techno drum beat",
    "qwerty zxcvb",  # no known word
)


def _sound(**kwargs: object) -> SynthAdapter:
    return SynthAdapter(sample_rate=16_000, kind=Kind.SOUND, **kwargs)  # type: ignore[arg-type]


def _music(**kwargs: object) -> SynthAdapter:
    return SynthAdapter(sample_rate=32_000, kind=Kind.MUSIC, **kwargs)  # type: ignore[arg-type]


def _one(
    adapter: SynthAdapter, prompt: str, duration_s: float = 3.0, seed: int = 1, **params: float
) -> npt.NDArray[np.float32]:
    item = GenerationItem(prompt, duration_s, seed, SamplingParams(**params))  # type: ignore[arg-type]
    return adapter.generate([item])[0].samples


def _band_energies(samples: npt.NDArray[np.float32], sample_rate: int) -> npt.NDArray[np.float64]:
    """Share of energy in 24 log-spaced bands (a coarse spectrum), in log10."""
    power = np.abs(np.fft.rfft(samples[0].astype(np.float64))) ** 2
    hz = np.fft.rfftfreq(samples.shape[1], 1.0 / sample_rate)
    edges = np.geomspace(50.0, sample_rate / 2, 25)
    bands = np.array([power[(hz >= lo) & (hz < hi)].sum() for lo, hi in pairwise(edges)])
    return np.asarray(np.log10(bands / bands.sum() + 1e-12))


def _centroid_hz(samples: npt.NDArray[np.float32], sample_rate: int) -> float:
    magnitude = np.abs(np.fft.rfft(samples[0].astype(np.float64)))
    hz = np.fft.rfftfreq(samples.shape[1], 1.0 / sample_rate)
    return float((magnitude * hz).sum() / magnitude.sum())


def _correlation(a: npt.NDArray[np.float32], b: npt.NDArray[np.float32]) -> float:
    return float(np.corrcoef(a[0], b[0])[0, 1])


def test_the_adapter_satisfies_the_model_adapter_port() -> None:
    adapter: ModelAdapter = _sound()

    assert adapter.backend == "synth"


@pytest.mark.parametrize("duration_s", [0.02, 0.333, 1.0, 2.5, 7.77])
@pytest.mark.parametrize(("kind", "sample_rate"), [(Kind.SOUND, 16_000), (Kind.MUSIC, 32_000)])
def test_duration_is_exact(duration_s: float, kind: Kind, sample_rate: int) -> None:
    adapter = SynthAdapter(sample_rate=sample_rate, kind=kind)

    [audio] = adapter.generate([GenerationItem("a dog barking in the rain", duration_s, 7)])

    assert audio.samples.shape == (1, round(duration_s * sample_rate))
    assert audio.samples.dtype == np.float32
    assert audio.sample_rate == sample_rate


@pytest.mark.parametrize("fmt", list(AudioFormat))
@pytest.mark.parametrize(("kind", "sample_rate"), [(Kind.SOUND, 16_000), (Kind.MUSIC, 32_000)])
def test_a_duration_under_half_a_sample_still_makes_a_playable_file(
    fmt: AudioFormat, kind: Kind, sample_rate: int
) -> None:
    """0 < duration is valid input; none of the formats can hold zero frames."""
    adapter = SynthAdapter(sample_rate=sample_rate, kind=kind)

    [audio] = adapter.generate([GenerationItem("a click", 1e-9, 7)])

    assert audio.samples.shape == (1, 1)
    samples, rate = decode(encode(audio, fmt))
    assert rate == sample_rate and samples.shape[1] >= 1


def test_stereo_adapter_makes_two_channels() -> None:
    [audio] = SynthAdapter(sample_rate=32_000, channels=2, kind=Kind.MUSIC).generate(
        [GenerationItem("piano and rain", 1.5, 3)]
    )

    assert audio.samples.shape == (2, 48_000)
    assert not np.array_equal(audio.samples[0], audio.samples[1]), "layers are panned"


@pytest.mark.parametrize("make", [_sound, _music])
def test_same_prompt_seed_and_params_give_identical_samples(
    make: Callable[[], SynthAdapter],
) -> None:
    first = _one(make(), "birds and a dog in the rain", seed=42, temperature=0.8)
    again = _one(make(), "birds and a dog in the rain", seed=42, temperature=0.8)

    assert np.array_equal(first, again)


@pytest.mark.parametrize("make", [_sound, _music])
def test_different_seeds_give_different_audio(make: Callable[[], SynthAdapter]) -> None:
    for prompt in PROMPTS:
        one, two = _one(make(), prompt, seed=1), _one(make(), prompt, seed=2)

        assert abs(_correlation(one, two)) < 0.8, prompt


def test_params_are_part_of_the_seed() -> None:
    plain = _one(_sound(), "a dog barking", seed=1)
    hotter = _one(_sound(), "a dog barking", seed=1, temperature=1.5)

    assert abs(_correlation(plain, hotter)) < 0.8


@pytest.mark.parametrize(("make", "sample_rate"), [(_sound, 16_000), (_music, 32_000)])
def test_different_prompts_give_clearly_different_audio(
    make: Callable[[], SynthAdapter], sample_rate: int
) -> None:
    spectra = {prompt: _band_energies(_one(make(), prompt), sample_rate) for prompt in PROMPTS}
    waves = {prompt: _one(make(), prompt) for prompt in PROMPTS}

    for index, first in enumerate(PROMPTS):
        for second in PROMPTS[index + 1 :]:
            assert abs(_correlation(waves[first], waves[second])) < 0.5, (first, second)
            distance = float(np.mean(np.abs(spectra[first] - spectra[second])))
            assert distance > 0.1, (first, second)


def test_prompts_sound_like_what_they_name() -> None:
    sound = _sound()

    rain = _centroid_hz(_one(sound, "heavy rain"), 16_000)
    thunder = _centroid_hz(_one(sound, "thunder"), 16_000)
    birds = _centroid_hz(_one(sound, "birds chirping"), 16_000)
    dog = _centroid_hz(_one(sound, "a dog barking"), 16_000)

    assert rain > thunder + 1000, "rain hisses, thunder rumbles"
    assert birds > dog + 1000, "birds chirp above a bark"


@pytest.mark.parametrize("prompt", ["qwerty zxcvb", "hello world", "something strange"])
def test_music_leans_on_tones_and_sound_on_noise(prompt: str) -> None:
    """A prompt without known words: the music service plays notes (energy in a few
    spectral peaks), the sound service a texture (energy spread out)."""

    def tonality(samples: npt.NDArray[np.float32]) -> float:
        power = np.sort(np.abs(np.fft.rfft(samples[0].astype(np.float64))) ** 2)[::-1]
        return float(power[: len(power) // 200].sum() / power.sum())  # share of the top 0.5 %

    assert tonality(_one(_music(), prompt)) > 0.6
    assert tonality(_one(_sound(), prompt)) < 0.5


@pytest.mark.parametrize(("make", "sample_rate"), [(_sound, 16_000), (_music, 32_000)])
@pytest.mark.parametrize("prompt", PROMPTS)
def test_audio_is_audible_and_never_clips(
    make: Callable[[], SynthAdapter], sample_rate: int, prompt: str
) -> None:
    samples = _one(make(), prompt, duration_s=2.0)

    assert np.all(np.isfinite(samples))
    assert float(np.max(np.abs(samples))) <= 1.0
    rms = float(np.sqrt(np.mean(samples.astype(np.float64) ** 2)))
    assert rms > 0.03, f"RMS {rms:.4f} is close to silence"


def test_clips_start_and_end_without_a_click() -> None:
    samples = _one(_sound(), "rain", duration_s=1.0)

    assert abs(float(samples[0, 0])) < 0.01
    assert abs(float(samples[0, -1])) < 0.01


@dataclass
class _Recorder:
    calls: list[tuple[int, int]] = field(default_factory=list)

    def __call__(self, done: int, total: int) -> None:
        self.calls.append((done, total))


@pytest.mark.parametrize("durations_s", [[1.0], [0.5, 3.3, 2.0]])
def test_progress_is_monotone_and_reaches_total(durations_s: list[float]) -> None:
    recorder = _Recorder()
    adapter = _sound(progress_every_steps=10)
    items = [GenerationItem("wind", d, i) for i, d in enumerate(durations_s)]

    adapter.generate(items, recorder)

    total = math.ceil(50 * max(durations_s))  # 50 steps per audio second of the longest
    assert {t for _, t in recorder.calls} == {total}
    done = [d for d, _ in recorder.calls]
    assert done == sorted(done) and done[0] == 0 and done[-1] == total
    assert len(done) <= total // 10 + 2, "at most every 10 steps"


class _FakeClock:
    """Stands in for the ``time`` module of the synth adapter: sleeping advances the clock."""

    def __init__(self) -> None:
        self.now_s = 1000.0
        self.slept_s = 0.0
        self.sleeps = 0

    def monotonic(self) -> float:
        return self.now_s

    def sleep(self, seconds: float) -> None:
        self.now_s += seconds
        self.slept_s += seconds
        self.sleeps += 1


@pytest.fixture
def clock(monkeypatch: pytest.MonkeyPatch) -> Iterator[_FakeClock]:
    fake = _FakeClock()
    monkeypatch.setattr(synth_adapter, "time", fake)
    yield fake


@pytest.mark.parametrize("batch_size", [1, 8])
def test_step_delay_paces_the_whole_batch_once_per_step(clock: _FakeClock, batch_size: int) -> None:
    adapter = _sound(step_delay_s=0.02)
    items = [GenerationItem(f"rain {i}", 2.0, i) for i in range(batch_size)]

    adapter.generate(items)

    # 100 steps of 20 ms whatever the batch size: a GPU's cost per step.
    assert clock.sleeps == 100
    assert clock.slept_s == pytest.approx(2.0)


def test_no_step_delay_means_no_sleep(clock: _FakeClock) -> None:
    _sound().generate([GenerationItem("rain", 2.0, 1)])

    assert clock.sleeps == 0


def test_an_item_does_not_depend_on_its_batch_mates() -> None:
    adapter = _music()
    target = GenerationItem("jazz piano", 2.0, 11, SamplingParams(temperature=1.2))
    others = [GenerationItem("a dog barking", 4.5, 3), GenerationItem("drums", 0.7, 99)]

    [alone] = adapter.generate([target])
    batch = adapter.generate([others[0], target, others[1]])

    assert np.array_equal(batch[1].samples, alone.samples)
    assert [a.samples.shape[1] for a in batch] == [144_000, 64_000, 22_400]


def test_an_empty_batch_gives_nothing() -> None:
    assert _sound().generate([]) == []


def test_describe_is_honest_about_being_synthetic() -> None:
    facts = _sound(model_id="synth:facebook/audiogen-medium").describe()

    assert set(DESCRIBE_KEYS) <= set(facts)  # named as on the model backends
    assert facts["license"] is None  # no model weights, no weights licence
    assert facts["backend"] == "synth"
    assert facts["synthetic"] is True
    assert "not a neural model" in facts["description"]
    assert facts["model_id"] == "synth:facebook/audiogen-medium"


def test_load_reports_completion() -> None:
    adapter = _sound()
    reports: list[tuple[float, str]] = []

    adapter.load(lambda fraction, message: reports.append((fraction, message)))

    assert adapter.loaded
    assert reports and reports[-1][0] == 1.0


@pytest.mark.parametrize(("kind", "sample_rate"), [(Kind.SOUND, 16_000), (Kind.MUSIC, 32_000)])
def test_from_settings_follows_the_service_spec(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, kind: Kind, sample_rate: int
) -> None:
    monkeypatch.chdir(tmp_path)  # no stray .env
    monkeypatch.setenv("SYNTH_STEP_DELAY_MS", "25")
    spec = service_spec(kind)
    settings = load_settings(spec.settings_class, model="my-model")

    adapter = spec.backends["synth"](settings, spec)

    assert isinstance(adapter, SynthAdapter)
    assert adapter.model_id == "synth:my-model"
    assert adapter.sample_rate == sample_rate
    assert adapter.channels == spec.channels
    assert adapter.step_delay_s == pytest.approx(0.025)
