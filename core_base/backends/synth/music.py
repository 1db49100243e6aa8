"""The synth's music: a style from the prompt (scale, root, tempo, chords,
instrument), then melody, chord pad, bass and drum layers."""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from core_base.backends.synth import dsp
from core_base.backends.synth.context import Context, Layer, Signal
from core_base.backends.synth.instruments import TIMBRES

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
_INSTRUMENT_WORDS: dict[str, frozenset[str]] = {
    "piano": frozenset({"piano", "keys", "keyboard", "lofi", "jazz", "classical"}),
    "guitar": frozenset({"guitar", "acoustic", "strum", "strumming", "pluck", "plucked", "harp"}),
    "synth": frozenset({"synth", "synthesizer", "electronic", "arpeggio", "chiptune", "8bit"}),
    "bell": frozenset({"bell", "bells", "marimba", "xylophone", "glockenspiel"}),
}


@dataclass(frozen=True)
class MusicStyle:
    """The character of a prompt's music: tempo, key, chords and instrument."""

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


def music_style(ctx: Context) -> MusicStyle:
    """The style a prompt's words and hash call for (draws from ``ctx.style`` only)."""
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
    return MusicStyle(
        bpm=float(style.integers(low, high + 1)),
        root_midi=int(style.integers(55, 67)),  # G3 .. F#4
        scale=_SCALES[scale],
        progression=_PROGRESSIONS[int(style.integers(len(_PROGRESSIONS)))],
        instrument=instrument,
    )


def melody(ctx: Context) -> list[Layer]:
    """A random walk over the scale in the style's instrument, with rests."""
    music, rng = ctx.music, ctx.rng
    timbre = TIMBRES[music.instrument]
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
                cache[key] = dsp.tone(dsp.midi_to_hz(midi), ring_s, ctx.sample_rate, timbre)
            dsp.add_at(out, cache[key] * rng.uniform(0.7, 1.0), int(time_s * ctx.sample_rate))
        time_s += length_s
        step = round(rng.normal(0.0, 1.6 * ctx.temperature))
        degree = int(np.clip(degree + step, -3, 2 * len(music.scale)))
    return [Layer(out, 0.8, pan=0.2)]


def pad(ctx: Context) -> list[Layer]:
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
                dsp.tone(
                    dsp.midi_to_hz(music.midi(degree, -1)),
                    bar_s * 1.1,
                    ctx.sample_rate,
                    TIMBRES["pad"],
                )
                for degree in degrees
            ]
            chords[key] = np.sum(notes, axis=0)
        dsp.add_at(out, chords[key], int(bar * bar_s * ctx.sample_rate))
    return [Layer(out, 0.35, pan=-0.3)]


def bass(ctx: Context) -> list[Layer]:
    """The root of each chord, two octaves down, every half bar."""
    music = ctx.music
    half_s = 2 * music.beat_s
    out = np.zeros(ctx.frames)
    notes: dict[int, Signal] = {}
    for index in range(math.ceil(ctx.duration_s / half_s)):
        root = music.progression[(index // 2) % len(music.progression)]
        midi = max(music.midi(root, -2), 28)  # no lower than E1 (41 Hz)
        if midi not in notes:
            notes[midi] = dsp.tone(dsp.midi_to_hz(midi), half_s, ctx.sample_rate, TIMBRES["bass"])
        dsp.add_at(out, notes[midi], int(index * half_s * ctx.sample_rate))
    return [Layer(out, 0.5)]


def drums(ctx: Context) -> list[Layer]:
    """Kick, snare and hi-hat on a sixteenth-note grid, slightly humanised."""
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
            dsp.add_at(out, kick, start)
        if step in (4, 12):
            dsp.add_at(out, snare * rng.uniform(0.8, 1.0), start)
        elif step % hats_every == 0:
            dsp.add_at(out, hat * rng.uniform(0.3, 0.6), start)
    return [Layer(out, 0.8)]


def _kick(sr: int) -> Signal:
    t = dsp.time_axis(0.35, sr)
    hz = 45.0 + 90.0 * np.exp(-t / 0.04)
    return np.asarray(np.sin(2 * np.pi * np.cumsum(hz) / sr) * np.exp(-t / 0.12))


def _snare(sr: int, rng: np.random.Generator) -> Signal:
    t = dsp.time_axis(0.2, sr)
    noise = np.diff(rng.standard_normal(len(t) + 1)) * 0.25 * np.exp(-t / 0.06)
    return np.asarray(noise + 0.5 * np.sin(2 * np.pi * 185.0 * t) * np.exp(-t / 0.05))


def _hat(sr: int, rng: np.random.Generator) -> Signal:
    t = dsp.time_axis(0.06, sr)
    return np.asarray(np.diff(rng.standard_normal(len(t) + 1)) * 0.2 * np.exp(-t / 0.015))
