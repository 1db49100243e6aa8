"""The ``synth`` backend: a deterministic DSP sound generator. Not a model.

It exists so that ``dev``, the tests and the orchestration benchmarks run the
whole service without weights or a GPU, on audio that is real, audible and
depends on the prompt in a recognisable way:

* keywords pick layers: rain / water / wind / fire / thunder become filtered
  noise textures; dog / cat / bird become barks, meows and chirps; engine,
  siren, crowd, footsteps have their own sketches; drum / beat become a drum
  pattern at a tempo; piano / guitar / synth / strings / bass / melody become
  notes in a scale;
* the prompt alone (its hash) chooses the character: scale, root, tempo,
  timbre, noise colour; the seed and sampling params choose the details
  (which notes, when the dog barks), so the same prompt + seed + params always
  gives the same samples (for one :data:`SYNTH_VERSION`);
* a music service leans on tones (it always has a melody or chords), a sound
  service on noise (a prompt without known words becomes a coloured texture).

``temperature`` widens melodic steps and timing jitter; every param is part of
the seed. Generation advances in steps of 1/50 s of audio, like the real
models; ``step_delay_s`` paces the steps to emulate a GPU whose decoding cost
does not grow with the batch size.
"""

from __future__ import annotations

import hashlib
import math
import re
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import numpy.typing as npt

from core_base.domain import Kind
from core_base.generation.models import (
    GeneratedAudio,
    GenerationItem,
    LoadProgressCallback,
    ProgressCallback,
)

Signal = npt.NDArray[np.float64]

# Bump when the generated samples change, so that reproducibility records stay honest.
SYNTH_VERSION = "1"
# The real models decode 50 audio frames per second; synth steps match them.
STEPS_PER_SECOND = 50
# Progress is reported every this many steps (5 times per audio second).
DEFAULT_PROGRESS_EVERY_STEPS = 10
# Master peak: about -1 dBFS leaves room for codecs' overshoot.
MASTER_PEAK = 0.89
# Short fades at both ends so that no clip starts or stops with a click.
EDGE_FADE_S = 0.01


class SynthAdapter:
    """The ``ModelAdapter`` of the synth backend. Thread-safe: it keeps no state
    between calls, so several threads may generate at once."""

    backend = "synth"

    def __init__(
        self,
        *,
        model_id: str = "synth:default",
        sample_rate: int = 16_000,
        channels: int = 1,
        kind: Kind = Kind.SOUND,
        step_delay_s: float = 0.0,
        progress_every_steps: int = DEFAULT_PROGRESS_EVERY_STEPS,
    ) -> None:
        if sample_rate < 4_000 or channels not in (1, 2):
            raise ValueError(f"unsupported sample rate {sample_rate} or channels {channels}")
        if step_delay_s < 0 or progress_every_steps < 1:
            raise ValueError("step_delay_s must be >= 0 and progress_every_steps >= 1")
        self.model_id = model_id
        self.sample_rate = sample_rate
        self.channels = channels
        self.kind = kind
        self.step_delay_s = step_delay_s
        self.progress_every_steps = progress_every_steps
        self.loaded = False

    @classmethod
    def from_settings(cls, settings: Any, spec: Any) -> SynthAdapter:
        """Build from a ``GenerationSettings`` and its ``ServiceSpec``."""
        return cls(
            model_id=f"synth:{settings.model}",
            sample_rate=spec.sample_rate,
            channels=spec.channels,
            kind=spec.kind,
            step_delay_s=settings.synth_step_delay_ms / 1000.0,
        )

    def load(self, progress: LoadProgressCallback | None = None) -> None:
        """Nothing to load; reports completion at once."""
        self.loaded = True
        if progress is not None:
            progress(1.0, "synth backend: no weights to load")

    def generate(
        self, batch: Sequence[GenerationItem], progress: ProgressCallback | None = None
    ) -> list[GeneratedAudio]:
        """One audio per item, each exactly ``round(duration_s * sample_rate)`` frames.

        The batch takes ``ceil(50 * longest duration)`` steps; with a step delay
        each step costs the same whatever the batch size. Each item depends only
        on itself, never on its batch-mates.
        """
        if not batch:
            return []
        total_steps = max(1, math.ceil(STEPS_PER_SECOND * max(i.duration_s for i in batch) - 1e-9))
        started = time.monotonic()
        if progress is not None:
            progress(0, total_steps)
        results = [
            GeneratedAudio(
                samples=synthesize(
                    item,
                    sample_rate=self.sample_rate,
                    channels=self.channels,
                    music=self.kind is Kind.MUSIC,
                ),
                sample_rate=self.sample_rate,
            )
            for item in batch
        ]
        for step in range(1, total_steps + 1):
            if self.step_delay_s > 0:
                # Paced against a deadline, so rendering time is part of the budget
                # (as on a GPU) and sleep overhead does not accumulate.
                remaining_s = started + step * self.step_delay_s - time.monotonic()
                if remaining_s > 0:
                    time.sleep(remaining_s)
            if progress is not None and (
                step % self.progress_every_steps == 0 or step == total_steps
            ):
                progress(step, total_steps)
        return results

    def describe(self) -> dict[str, Any]:
        """What produced the audio: a DSP generator, not a neural model."""
        return {
            "backend": self.backend,
            "model_id": self.model_id,
            "synthetic": True,
            "description": (
                "deterministic DSP generator (filtered noise, tones, simple percussion) "
                "for development, tests and benchmarks; not a neural model, no weights"
            ),
            "version": SYNTH_VERSION,
            "license": "generated by code; no model weights involved",
            "device": "cpu",
            "sample_rate": self.sample_rate,
            "channels": self.channels,
            "step_delay_s": self.step_delay_s,
        }


# --- planning: from prompt to layers --------------------------------------------


@dataclass
class _Context:
    """Everything a layer needs to render itself."""

    frames: int
    sample_rate: int
    rng: np.random.Generator  # prompt + seed + params: the details
    style: np.random.Generator  # prompt only: the character
    words: frozenset[str]
    temperature: float
    music: _MusicStyle = field(init=False)

    @property
    def duration_s(self) -> float:
        return self.frames / self.sample_rate

    @property
    def top_hz(self) -> float:
        """Highest frequency worth generating (below Nyquist, with margin)."""
        return 0.45 * self.sample_rate


@dataclass(frozen=True)
class _Layer:
    signal: Signal
    weight: float
    pan: float = 0.0  # -1 left .. 1 right


LayerFn = Callable[[_Context], list[_Layer]]


def synthesize(
    item: GenerationItem, *, sample_rate: int, channels: int, music: bool
) -> npt.NDArray[np.float32]:
    """Render one item: float32 samples in [-1, 1], shape (channels, frames)."""
    frames = round(item.duration_s * sample_rate)
    if frames <= 0:
        return np.zeros((channels, 0), dtype=np.float32)
    prompt = " ".join(item.prompt.split())
    # Any change of the text changes the audio; keywords ignore case.
    prompt_seed = _digest_words(prompt)
    params_seed = _digest_words(item.params.model_dump_json())
    ctx = _Context(
        frames=frames,
        sample_rate=sample_rate,
        rng=np.random.default_rng([*prompt_seed, item.seed % 2**64, *params_seed]),
        style=np.random.default_rng(prompt_seed),
        words=frozenset(re.findall(r"[a-z0-9]+", prompt.lower())),
        temperature=item.params.temperature if item.params.temperature is not None else 1.0,
    )
    ctx.music = _music_style(ctx)
    layers: list[_Layer] = []
    for layer_fn in _plan(ctx.words, music=music, style=ctx.style):
        layers.extend(layer_fn(ctx))
    return _mix(layers, frames, channels, sample_rate)


def _plan(words: frozenset[str], *, music: bool, style: np.random.Generator) -> list[LayerFn]:
    chosen = [fn for keywords, fn in _KEYWORD_LAYERS if words & keywords]
    has_music = any(fn in _MUSIC_LAYERS for fn in chosen)
    if music and not has_music:
        # A music service always plays music; the prompt hash decides whether it grooves.
        chosen += [_melody, _pad] + ([_drums] if style.random() < 0.5 else [])
    elif music and _drums in chosen and not (set(chosen) & {_melody, _pad, _bass}):
        chosen += [_bass]
    if not chosen:
        chosen = [_texture, _pings]
    if not music:
        chosen.append(_room_tone)
    return list(dict.fromkeys(chosen))


def _digest_words(text: str) -> list[int]:
    """Four 32-bit words of the text's SHA-256: a seed stable across processes
    (unlike ``hash()``)."""
    digest = hashlib.sha256(text.encode("utf-8")).digest()
    return [int.from_bytes(digest[i : i + 4], "little") for i in range(0, 16, 4)]


def _mix(
    layers: list[_Layer], frames: int, channels: int, sample_rate: int
) -> npt.NDArray[np.float32]:
    """Sum the layers (each at its peak times its weight), pan, fade the edges,
    and scale the whole to :data:`MASTER_PEAK`."""
    out = np.zeros((channels, frames))
    for layer in layers:
        signal = _normalise(layer.signal[:frames]) * layer.weight
        if channels == 1:
            out[0, : len(signal)] += signal
        else:
            angle = (np.clip(layer.pan, -1.0, 1.0) + 1.0) * math.pi / 4  # constant power
            out[0, : len(signal)] += signal * math.cos(angle)
            out[1, : len(signal)] += signal * math.sin(angle)
    fade = min(frames // 2, int(EDGE_FADE_S * sample_rate))
    if fade > 0:
        ramp = np.linspace(0.0, 1.0, fade)
        out[:, :fade] *= ramp
        out[:, frames - fade :] *= ramp[::-1]
    peak = float(np.max(np.abs(out)))
    if peak > 0:
        out *= MASTER_PEAK / peak
    return out.astype(np.float32)


# --- music --------------------------------------------------------------------

_SCALES: dict[str, tuple[int, ...]] = {
    "major": (0, 2, 4, 5, 7, 9, 11),
    "minor": (0, 2, 3, 5, 7, 8, 10),
    "dorian": (0, 2, 3, 5, 7, 9, 10),
    "mixolydian": (0, 2, 4, 5, 7, 9, 10),
    "pentatonic": (0, 2, 4, 7, 9),
    "minor_pentatonic": (0, 3, 5, 7, 10),
}
_SAD = frozenset({"sad", "dark", "minor", "melancholic", "melancholy", "moody", "gloomy", "tense"})
_HAPPY = frozenset({"happy", "bright", "major", "cheerful", "joyful", "uplifting", "sunny"})
_FAST = frozenset({"fast", "upbeat", "energetic", "dance", "techno", "edm", "house", "drum", "dnb"})
_SLOW = frozenset({"slow", "calm", "chill", "relaxing", "lofi", "lo", "ambient", "gentle", "soft"})
# Chord roots as scale degrees, one chord per bar.
_PROGRESSIONS = ((0, 5, 3, 4), (0, 3, 4, 0), (5, 3, 0, 4), (0, 4, 5, 3), (0, 6, 5, 4))


@dataclass(frozen=True)
class _Timbre:
    """Partial k (from 1) has amplitude ``amps[k-1]``, frequency ratio ``k`` (or
    ``ratios[k-1]`` for an inharmonic sound) and decays at
    ``decay_per_s + decay_slope_per_s * k``: brighter at the attack, duller later."""

    amps: tuple[float, ...]
    decay_per_s: float
    decay_slope_per_s: float
    attack_s: float
    release_s: float
    ratios: tuple[float, ...] | None = None


def _harmonic(
    count: int, tilt: float, decay: float, decay_slope: float, attack_s: float, release_s: float
) -> _Timbre:
    """Partials 1..count with amplitudes 1/k**tilt."""
    amps = tuple(1.0 / k**tilt for k in range(1, count + 1))
    return _Timbre(amps, decay, decay_slope, attack_s, release_s)


_TIMBRES: dict[str, _Timbre] = {
    "piano": _harmonic(8, 1.3, 1.2, 0.7, 0.004, 0.08),
    # Plucked near a fifth of the string: that partial series, fast-dying highs.
    "guitar": _Timbre(
        tuple(abs(math.sin(math.pi * k * 0.22)) / k for k in range(1, 11)), 2.0, 1.4, 0.002, 0.05
    ),
    "synth": _harmonic(12, 1.0, 0.3, 0.05, 0.01, 0.05),
    "bell": _Timbre((1.0, 0.5, 0.25, 0.12), 0.5, 1.8, 0.002, 0.1, ratios=(1.0, 2.76, 5.4, 8.93)),
    "pad": _harmonic(6, 1.4, 0.0, 0.05, 0.35, 0.4),
    "bass": _harmonic(5, 1.6, 0.8, 0.4, 0.008, 0.06),
}
_INSTRUMENT_WORDS: dict[str, frozenset[str]] = {
    "piano": frozenset({"piano", "keys", "keyboard", "lofi", "jazz", "classical"}),
    "guitar": frozenset({"guitar", "acoustic", "strum", "strumming", "pluck", "plucked", "harp"}),
    "synth": frozenset({"synth", "synthesizer", "electronic", "arpeggio", "chiptune", "8bit"}),
    "bell": frozenset({"bell", "bells", "marimba", "xylophone", "glockenspiel"}),
}


@dataclass(frozen=True)
class _MusicStyle:
    bpm: float
    root_midi: int
    scale: tuple[int, ...]
    progression: tuple[int, ...]
    instrument: str

    @property
    def beat_s(self) -> float:
        return 60.0 / self.bpm

    def midi(self, degree: int, octave: int = 0) -> int:
        steps = len(self.scale)
        return self.root_midi + 12 * (octave + degree // steps) + self.scale[degree % steps]


def _music_style(ctx: _Context) -> _MusicStyle:
    style, words = ctx.style, ctx.words
    if words & _SAD:
        scale = str(style.choice(["minor", "dorian", "minor_pentatonic"]))
    elif words & _HAPPY:
        scale = str(style.choice(["major", "mixolydian", "pentatonic"]))
    else:
        scale = str(style.choice(list(_SCALES)))
    low, high = (120, 150) if words & _FAST else (68, 88) if words & _SLOW else (84, 128)
    named = [name for name, keys in _INSTRUMENT_WORDS.items() if words & keys]
    instrument = named[0] if named else str(style.choice(["piano", "guitar", "synth", "bell"]))
    return _MusicStyle(
        bpm=float(style.integers(low, high + 1)),
        root_midi=int(style.integers(55, 67)),  # G3 .. F#4
        scale=_SCALES[scale],
        progression=_PROGRESSIONS[int(style.integers(len(_PROGRESSIONS)))],
        instrument=instrument,
    )


def _melody(ctx: _Context) -> list[_Layer]:
    music, rng = ctx.music, ctx.rng
    timbre = _TIMBRES[music.instrument]
    out = np.zeros(ctx.frames)
    cache: dict[tuple[int, int], Signal] = {}
    time_s, degree = 0.0, 0
    lengths_beats = (0.5, 0.5, 1.0, 1.0, 1.0, 2.0)
    while time_s < ctx.duration_s:
        length_s = float(rng.choice(lengths_beats)) * music.beat_s
        if rng.random() > 0.1:  # else a rest
            midi = music.midi(degree)
            key = (midi, int(length_s * ctx.sample_rate))
            if key not in cache:
                ring_s = length_s * (2.0 if timbre.release_s < 0.1 else 1.0)
                cache[key] = _tone(_hz(midi), ring_s, ctx.sample_rate, timbre)
            _add(out, cache[key] * rng.uniform(0.7, 1.0), int(time_s * ctx.sample_rate))
        time_s += length_s
        step = round(rng.normal(0.0, 1.6 * ctx.temperature))
        degree = int(np.clip(degree + step, -3, 2 * len(music.scale)))
    return [_Layer(out, 0.8, pan=0.2)]


def _pad(ctx: _Context) -> list[_Layer]:
    """Sustained triads, one per bar; the seed picks each chord's inversion."""
    music = ctx.music
    bar_s = 4 * music.beat_s
    out = np.zeros(ctx.frames)
    chords: dict[tuple[int, int], Signal] = {}
    for bar in range(math.ceil(ctx.duration_s / bar_s)):
        key = (music.progression[bar % len(music.progression)], int(ctx.rng.integers(3)))
        if key not in chords:
            root, inversion = key
            degrees = [
                root + third + (len(music.scale) if index < inversion else 0)
                for index, third in enumerate((0, 2, 4))
            ]
            notes = [
                _tone(_hz(music.midi(degree, -1)), bar_s * 1.1, ctx.sample_rate, _TIMBRES["pad"])
                for degree in degrees
            ]
            chords[key] = np.sum(notes, axis=0)
        _add(out, chords[key], int(bar * bar_s * ctx.sample_rate))
    return [_Layer(out, 0.35, pan=-0.3)]


def _bass(ctx: _Context) -> list[_Layer]:
    music = ctx.music
    half_s = 2 * music.beat_s
    out = np.zeros(ctx.frames)
    notes: dict[int, Signal] = {}
    for index in range(math.ceil(ctx.duration_s / half_s)):
        root = music.progression[(index // 2) % len(music.progression)]
        midi = max(music.midi(root, -2), 28)  # no lower than E1 (41 Hz)
        if midi not in notes:
            notes[midi] = _tone(_hz(midi), half_s, ctx.sample_rate, _TIMBRES["bass"])
        _add(out, notes[midi], int(index * half_s * ctx.sample_rate))
    return [_Layer(out, 0.5)]


def _drums(ctx: _Context) -> list[_Layer]:
    music, rng, sr = ctx.music, ctx.rng, ctx.sample_rate
    sixteenth_s = music.beat_s / 4
    kick, snare, hat = _kick(sr), _snare(sr, rng), _hat(sr, rng)
    kicks = {0, 8} | {s for s in (3, 6, 10, 11, 14) if ctx.style.random() < 0.3}
    hats_every = 1 if ctx.words & _FAST else 2
    out = np.zeros(ctx.frames)
    for index in range(math.ceil(ctx.duration_s / sixteenth_s)):
        step = index % 16
        jitter_s = rng.normal(0.0, 0.004 * ctx.temperature)
        start = max(0, int((index * sixteenth_s + jitter_s) * sr))
        if step in kicks:
            _add(out, kick, start)
        if step in (4, 12):
            _add(out, snare * rng.uniform(0.8, 1.0), start)
        elif step % hats_every == 0:
            _add(out, hat * rng.uniform(0.3, 0.6), start)
    return [_Layer(out, 0.8)]


def _kick(sr: int) -> Signal:
    t = _time(0.35, sr)
    hz = 45.0 + 90.0 * np.exp(-t / 0.04)
    return np.asarray(np.sin(2 * np.pi * np.cumsum(hz) / sr) * np.exp(-t / 0.12))


def _snare(sr: int, rng: np.random.Generator) -> Signal:
    t = _time(0.2, sr)
    noise = np.diff(rng.standard_normal(len(t) + 1)) * 0.25 * np.exp(-t / 0.06)
    return np.asarray(noise + 0.5 * np.sin(2 * np.pi * 185.0 * t) * np.exp(-t / 0.05))


def _hat(sr: int, rng: np.random.Generator) -> Signal:
    t = _time(0.06, sr)
    return np.asarray(np.diff(rng.standard_normal(len(t) + 1)) * 0.2 * np.exp(-t / 0.015))


# --- sound textures and events ---------------------------------------------------


def _rain(ctx: _Context) -> list[_Layer]:
    bed = _noise(ctx, 700.0, ctx.top_hz, tilt_db_per_octave=-1.5)
    rate_hz = float(ctx.style.uniform(25, 60))
    drops = _scatter(
        ctx,
        rate_hz,
        lambda rng: _ping(ctx.sample_rate, rng.uniform(1500, min(5000, ctx.top_hz)), 0.004, 0.02),
    )
    return [_Layer(bed, 0.55, pan=-0.2), _Layer(drops, 0.45, pan=0.3)]


def _water(ctx: _Context) -> list[_Layer]:
    bed = _noise(ctx, 60.0, 1200.0, tilt_db_per_octave=-3.0)
    swell = 0.35 + 0.65 * _slow_envelope(ctx, rate_hz=0.15) ** 2  # waves come and go
    layers = [_Layer(bed * swell, 0.8)]
    if ctx.words & {"stream", "brook", "creek", "bubbling", "bubbles", "river", "fountain"}:
        blips = _scatter(
            ctx,
            12.0,
            lambda rng: _chirp(
                ctx.sample_rate, rng.uniform(300, 500), rng.uniform(700, 1200), 0.03
            ),
        )
        layers.append(_Layer(blips, 0.35, pan=0.3))
    return layers


def _wind(ctx: _Context) -> list[_Layer]:
    base_hz = float(ctx.style.uniform(180, 320))
    out = np.zeros(ctx.frames)
    for factor in (1.0, 2.3, 5.0):
        band = _noise(ctx, base_hz * factor * 0.7, base_hz * factor * 1.4)
        out += band * _slow_envelope(ctx, rate_hz=0.4 * factor) ** 2 / factor
    return [_Layer(out, 0.8)]


def _fire(ctx: _Context) -> list[_Layer]:
    rumble = _noise(ctx, 30.0, 400.0, tilt_db_per_octave=-6.0)
    crackles = _scatter(ctx, float(ctx.style.uniform(6, 15)), lambda rng: _click(ctx, rng))
    return [_Layer(rumble, 0.4), _Layer(crackles, 0.9, pan=0.2)]


def _thunder(ctx: _Context) -> list[_Layer]:
    rumble = _noise(ctx, 20.0, 250.0, tilt_db_per_octave=-6.0)
    envelope = 0.15 + np.zeros(ctx.frames)
    t = np.arange(ctx.frames) / ctx.sample_rate
    for onset_s in _onsets(ctx, rate_hz=0.15, minimum=1):
        after = t - onset_s
        envelope += np.where(
            after >= 0, np.exp(-np.clip(after, 0, None) / ctx.rng.uniform(0.8, 2.0)), 0.0
        )
    return [_Layer(rumble * envelope, 1.0)]


def _dog(ctx: _Context) -> list[_Layer]:
    pitch_hz = float(ctx.style.uniform(300, 600))
    out = np.zeros(ctx.frames)
    for onset_s in _onsets(ctx, rate_hz=0.8, minimum=1):
        for repeat in range(int(ctx.rng.integers(1, 4))):
            bark = _bark(
                ctx.sample_rate, pitch_hz * ctx.rng.uniform(0.9, 1.1), ctx.rng.uniform(0.12, 0.22)
            )
            _add(out, bark, int((onset_s + repeat * 0.28) * ctx.sample_rate))
    return [_Layer(out, 1.0, pan=-0.2)]


def _cat(ctx: _Context) -> list[_Layer]:
    pitch_hz = float(ctx.style.uniform(420, 620))
    out = np.zeros(ctx.frames)
    for onset_s in _onsets(ctx, rate_hz=0.45, minimum=1):
        meow = _meow(
            ctx.sample_rate, pitch_hz * ctx.rng.uniform(0.9, 1.1), ctx.rng.uniform(0.5, 0.9)
        )
        _add(out, meow, int(onset_s * ctx.sample_rate))
    return [_Layer(out, 1.0, pan=0.2)]


def _birds(ctx: _Context) -> list[_Layer]:
    layers = []
    for bird in range(int(ctx.style.integers(1, 4))):
        base_hz = min(float(ctx.style.uniform(2200, 4200)), ctx.top_hz / 1.6)
        out = np.zeros(ctx.frames)
        for onset_s in _onsets(ctx, rate_hz=0.7, minimum=1):
            for note in range(int(ctx.rng.integers(2, 8))):
                rise = ctx.rng.uniform(1.2, 1.6)
                chirp = _chirp(ctx.sample_rate, base_hz, base_hz * rise, ctx.rng.uniform(0.04, 0.1))
                _add(out, chirp, int((onset_s + note * 0.09) * ctx.sample_rate))
        layers.append(_Layer(out, 0.8, pan=-0.5 + 0.5 * bird))
    return layers


def _engine(ctx: _Context) -> list[_Layer]:
    firing_hz = float(ctx.style.uniform(25, 50)) * (1 + 0.05 * (_slow_envelope(ctx, 0.3) - 0.5))
    cycles = np.cumsum(firing_hz) / ctx.sample_rate
    buzz = np.zeros(ctx.frames, dtype=np.float32)
    for k in range(1, 16):
        buzz += _sin_cycles(k * cycles) / np.float32(k)
    return [_Layer(buzz.astype(np.float64), 0.7), _Layer(_noise(ctx, 40.0, 900.0, -3.0), 0.3)]


def _siren(ctx: _Context) -> list[_Layer]:
    period_s = float(ctx.style.uniform(1.0, 3.0))
    t = np.arange(ctx.frames) / ctx.sample_rate
    cycles = np.cumsum(950.0 + 350.0 * _sin_cycles(t / period_s)) / ctx.sample_rate
    tone = _sin_cycles(cycles) + 0.4 * _sin_cycles(2 * cycles) + 0.2 * _sin_cycles(3 * cycles)
    return [_Layer(tone.astype(np.float64), 0.7)]


def _crowd(ctx: _Context) -> list[_Layer]:
    out = np.zeros(ctx.frames)
    speech_band = _noise(ctx, 250.0, min(3500.0, ctx.top_hz))
    for _ in range(6):
        # Six voices, each a syllable-rate burst of speech-band noise; shifting one
        # noise decorrelates the voices at a sixth of the cost of six noises.
        voice = np.roll(speech_band, int(ctx.rng.integers(ctx.frames)))
        out += voice * _slow_envelope(ctx, rate_hz=float(ctx.rng.uniform(4, 7))) ** 3
    layers = [_Layer(out, 0.7)]
    if ctx.words & {"applause", "clapping", "claps", "clap"}:
        claps = _scatter(ctx, 25.0, lambda rng: _click(ctx, rng, length_s=0.012))
        layers.append(_Layer(claps, 0.8, pan=0.2))
    return layers


def _steps(ctx: _Context) -> list[_Layer]:
    interval_s = float(ctx.style.uniform(0.45, 0.65))
    thump = _tone(float(ctx.style.uniform(90, 160)), 0.08, ctx.sample_rate, _TIMBRES["bass"])
    out = np.zeros(ctx.frames)
    for index in range(int(ctx.duration_s / interval_s) + 1):
        start_s = index * interval_s + ctx.rng.normal(0, 0.015 * ctx.temperature)
        _add(out, thump * ctx.rng.uniform(0.6, 1.0), max(0, int(start_s * ctx.sample_rate)))
    return [_Layer(out + 0.1 * _noise(ctx, 60.0, 400.0), 1.0)]


def _texture(ctx: _Context) -> list[_Layer]:
    """A prompt without known words: noise coloured by the prompt's hash."""
    low_hz = float(ctx.style.uniform(60, 1200))
    high_hz = min(low_hz * float(ctx.style.uniform(2, 8)), ctx.top_hz)
    bed = _noise(ctx, low_hz, high_hz, float(ctx.style.uniform(-6, 0)))
    return [_Layer(bed * (0.4 + 0.6 * _slow_envelope(ctx, 0.25)), 0.6)]


def _pings(ctx: _Context) -> list[_Layer]:
    pitch_hz = min(float(ctx.style.uniform(300, 2000)), ctx.top_hz / 3)
    out = _scatter(
        ctx,
        1.0,
        lambda rng: _tone(
            pitch_hz * rng.choice([1.0, 1.25, 1.5]), 0.4, ctx.sample_rate, _TIMBRES["bell"]
        ),
    )
    return [_Layer(out, 0.5, pan=0.3)]


def _room_tone(ctx: _Context) -> list[_Layer]:
    return [_Layer(_noise(ctx, 40.0, min(6000.0, ctx.top_hz), -3.0), 0.04)]


_MUSIC_LAYERS = frozenset({_melody, _pad, _bass, _drums})
_KEYWORD_LAYERS: tuple[tuple[frozenset[str], LayerFn], ...] = (
    (
        frozenset(
            {"rain", "raining", "rainy", "rainfall", "drizzle", "downpour", "shower", "storm"}
        ),
        _rain,
    ),
    (
        frozenset(
            {
                "water",
                "stream",
                "river",
                "brook",
                "creek",
                "ocean",
                "sea",
                "waves",
                "wave",
                "waterfall",
                "splash",
                "bubbling",
                "bubbles",
                "fountain",
                "beach",
                "surf",
            }
        ),
        _water,
    ),
    (
        frozenset({"wind", "windy", "breeze", "gust", "gusts", "howling", "blizzard", "storm"}),
        _wind,
    ),
    (
        frozenset({"fire", "crackling", "crackle", "campfire", "fireplace", "burning", "flames"}),
        _fire,
    ),
    (frozenset({"thunder", "thunderstorm", "rumble", "rumbling"}), _thunder),
    (frozenset({"dog", "dogs", "bark", "barks", "barking", "puppy", "woof"}), _dog),
    (frozenset({"cat", "cats", "meow", "meows", "meowing", "kitten", "kitty"}), _cat),
    (
        frozenset(
            {
                "bird",
                "birds",
                "chirp",
                "chirps",
                "chirping",
                "tweet",
                "tweeting",
                "songbird",
                "birdsong",
                "sparrow",
                "robin",
            }
        ),
        _birds,
    ),
    (
        frozenset(
            {
                "engine",
                "car",
                "cars",
                "motor",
                "traffic",
                "truck",
                "motorcycle",
                "idling",
                "machine",
                "vehicle",
            }
        ),
        _engine,
    ),
    (frozenset({"siren", "sirens", "alarm", "ambulance", "police"}), _siren),
    (
        frozenset(
            {
                "crowd",
                "people",
                "talking",
                "chatter",
                "applause",
                "clapping",
                "cafe",
                "restaurant",
                "market",
            }
        ),
        _crowd,
    ),
    (
        frozenset({"footsteps", "footstep", "steps", "walking", "running", "knock", "knocking"}),
        _steps,
    ),
    (
        frozenset(
            {
                "drum",
                "drums",
                "beat",
                "beats",
                "percussion",
                "kick",
                "snare",
                "hihat",
                "techno",
                "house",
                "hip",
                "hop",
                "trap",
                "rock",
                "funk",
                "groove",
                "dance",
                "edm",
                "dnb",
            }
        ),
        _drums,
    ),
    (
        frozenset(
            {
                "melody",
                "piano",
                "guitar",
                "synth",
                "synthesizer",
                "keys",
                "music",
                "song",
                "tune",
                "jazz",
                "classical",
                "lofi",
                "arpeggio",
                "bell",
                "bells",
                "marimba",
                "harp",
                "xylophone",
                "chiptune",
                "violin",
                "flute",
            }
        ),
        _melody,
    ),
    (
        frozenset(
            {
                "pad",
                "strings",
                "orchestra",
                "orchestral",
                "ambient",
                "cinematic",
                "choir",
                "chords",
                "cello",
                "lofi",
            }
        ),
        _pad,
    ),
    (frozenset({"bass", "bassline", "808"}), _bass),
)


# --- DSP primitives ---------------------------------------------------------------


def _time(length_s: float, sr: int) -> Signal:
    return np.arange(max(1, int(length_s * sr))) / sr


def _hz(midi: int) -> float:
    return float(440.0 * 2.0 ** ((midi - 69) / 12))


def _normalise(signal: Signal) -> Signal:
    peak = float(np.max(np.abs(signal))) if len(signal) else 0.0
    return signal / peak if peak > 0 else signal


def _add(out: Signal, event: Signal, start: int) -> None:
    """Mix ``event`` into ``out`` at ``start``, cut at the end of ``out``."""
    if start >= len(out):
        return
    length = min(len(event), len(out) - start)
    out[start : start + length] += event[:length]


def _noise(ctx: _Context, low_hz: float, high_hz: float, tilt_db_per_octave: float = 0.0) -> Signal:
    """Band-limited noise shaped in the frequency domain (gentle 2nd-order edges)."""
    spectrum = np.fft.rfft(ctx.rng.standard_normal(ctx.frames))
    hz = np.maximum(np.fft.rfftfreq(ctx.frames, 1.0 / ctx.sample_rate), 1.0)
    shape = 1.0 / np.sqrt((1 + (low_hz / hz) ** 4) * (1 + (hz / high_hz) ** 4))
    shape *= (hz / 1000.0) ** (tilt_db_per_octave / 6.02)
    return _normalise(np.fft.irfft(spectrum * shape, ctx.frames))


def _slow_envelope(ctx: _Context, rate_hz: float) -> Signal:
    """A smooth random curve in [0, 1] with about ``rate_hz`` changes per second."""
    points = max(2, int(ctx.duration_s * rate_hz) + 2)
    knots_x = np.linspace(0, ctx.frames, points)
    knots_y = ctx.rng.random(points)
    curve = np.interp(np.arange(ctx.frames), knots_x, knots_y)
    return np.asarray(0.5 - 0.5 * np.cos(np.pi * curve))  # eases the corners


def _onsets(ctx: _Context, rate_hz: float, minimum: int = 0) -> list[float]:
    """Random event times (seconds): about ``rate_hz`` per second, at least ``minimum``,
    the first one early so that short clips still hear it."""
    count = max(minimum, int(ctx.rng.poisson(rate_hz * ctx.duration_s * min(ctx.temperature, 3.0))))
    times = np.sort(ctx.rng.uniform(0.0, ctx.duration_s, count))
    if count:
        times[0] = min(times[0], ctx.rng.uniform(0.0, min(0.3, ctx.duration_s / 4)))
    return [float(x) for x in times]


def _scatter(
    ctx: _Context, rate_hz: float, make: Callable[[np.random.Generator], Signal]
) -> Signal:
    out = np.zeros(ctx.frames)
    for onset_s in _onsets(ctx, rate_hz, minimum=1):
        _add(out, make(ctx.rng) * ctx.rng.uniform(0.3, 1.0), int(onset_s * ctx.sample_rate))
    return out


def _tone(hz: float, length_s: float, sr: int, timbre: _Timbre) -> Signal:
    """An additive note: partials with their own decays, an attack and a release."""
    t = _time(length_s, sr)
    top_hz = 0.45 * sr
    per_partial = np.exp(-timbre.decay_slope_per_s * t).astype(np.float32)
    fade = per_partial.copy()  # per_partial ** k
    signal = np.zeros(len(t), dtype=np.float32)
    if timbre.ratios is None:
        # sin(k x) by the Chebyshev recurrence: one sine per note instead of one per partial.
        cycles = hz * t
        twice_cos = 2 * _cos_cycles(cycles)
        previous, current = np.zeros(len(t), dtype=np.float32), _sin_cycles(cycles)
        for k, amp in enumerate(timbre.amps, start=1):
            if hz * k >= top_hz:
                break
            signal += np.float32(amp) * fade * current
            previous, current = current, twice_cos * current - previous
            fade *= per_partial
    else:
        for ratio, amp in zip(timbre.ratios, timbre.amps, strict=True):
            if hz * ratio < top_hz:
                signal += np.float32(amp) * fade * _sin_cycles(hz * ratio * t)
            fade *= per_partial
    envelope = np.exp(-timbre.decay_per_s * t) * np.minimum(1.0, t / max(timbre.attack_s, 1.0 / sr))
    release = min(len(t), int(timbre.release_s * sr))
    if release > 0:
        envelope[-release:] *= np.linspace(1.0, 0.0, release)
    return np.asarray(signal * envelope, dtype=np.float64)


def _sin_cycles(cycles: Signal) -> npt.NDArray[np.float32]:
    """sin(2π·cycles). The whole cycles are dropped in float64 so that float32, whose
    vectorised sine is many times faster, keeps full precision on long notes."""
    fraction = (cycles - np.floor(cycles)).astype(np.float32)
    sine: npt.NDArray[np.float32] = np.sin(np.float32(2 * np.pi) * fraction)
    return sine


def _cos_cycles(cycles: Signal) -> npt.NDArray[np.float32]:
    """cos(2π·cycles), as :func:`_sin_cycles`."""
    fraction = (cycles - np.floor(cycles)).astype(np.float32)
    cosine: npt.NDArray[np.float32] = np.cos(np.float32(2 * np.pi) * fraction)
    return cosine


def _ping(sr: int, hz: float, decay_s: float, length_s: float) -> Signal:
    t = _time(length_s, sr)
    return np.asarray(np.sin(2 * np.pi * hz * t) * np.exp(-t / decay_s))


def _chirp(sr: int, start_hz: float, end_hz: float, length_s: float) -> Signal:
    t = _time(length_s, sr)
    hz = np.geomspace(start_hz, end_hz, len(t))
    window = np.sin(np.pi * np.linspace(0.0, 1.0, len(t)))
    return np.asarray(np.sin(2 * np.pi * np.cumsum(hz) / sr) * window)


def _click(ctx: _Context, rng: np.random.Generator, length_s: float = 0.003) -> Signal:
    t = _time(length_s, ctx.sample_rate)
    burst = np.diff(rng.standard_normal(len(t) + 1)) * np.exp(-t / (length_s / 3))
    return np.asarray(burst * rng.pareto(3.0))


def _bark(sr: int, pitch_hz: float, length_s: float) -> Signal:
    """A harmonic burst with a rising-falling pitch and a formant near 1.2 kHz."""
    t = _time(length_s, sr)
    contour = pitch_hz * (1.0 + 0.35 * np.sin(np.pi * t / length_s))
    phase = 2 * np.pi * np.cumsum(contour) / sr
    out = np.zeros(len(t))
    for k in range(1, 14):
        if pitch_hz * k * 1.35 >= 0.45 * sr:
            break
        formant = math.exp(-(((pitch_hz * k - 1200.0) / 700.0) ** 2))
        out += (0.3 / k + formant) * np.sin(k * phase)
    envelope = np.minimum(1.0, t / 0.01) * np.exp(-t / (length_s / 2.5))
    return np.asarray(out * envelope)


def _meow(sr: int, pitch_hz: float, length_s: float) -> Signal:
    """A pitch glide up and down whose formant slides from 'ee' to 'ow'."""
    t = _time(length_s, sr)
    position = t / length_s
    contour = pitch_hz * (1.0 + 0.5 * np.sin(np.pi * position**0.7))
    formant_hz = 2600.0 - 1700.0 * position
    phase = 2 * np.pi * np.cumsum(contour) / sr
    out = np.zeros(len(t))
    for k in range(1, 12):
        gain = np.exp(-(((contour * k - formant_hz) / 900.0) ** 2)) + 0.2 / k
        out += gain * np.sin(k * phase) * (contour * k < 0.45 * sr)
    return np.asarray(out * np.sin(np.pi * position) ** 0.8)
