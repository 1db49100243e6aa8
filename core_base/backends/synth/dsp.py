"""Signal primitives of the synth: noise, envelopes, onsets, additive tones,
chirps, clicks, barks and meows. Every random draw comes from the caller's
generator, so the same generator state gives the same samples."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from core_base.backends.synth.context import Context, Signal


@dataclass(frozen=True)
class Timbre:
    """Partial k (from 1) has amplitude ``amps[k-1]``, frequency ratio ``k`` (or
    ``ratios[k-1]`` for an inharmonic sound) and decays at
    ``decay_per_s + decay_slope_per_s * k``: brighter at the attack, duller later."""

    amps: tuple[float, ...]
    decay_per_s: float
    decay_slope_per_s: float
    attack_s: float
    release_s: float
    ratios: tuple[float, ...] | None = None


def time_axis(length_s: float, sr: int) -> Signal:
    """Sample times (s) of a sound ``length_s`` long, at least one sample."""
    return np.arange(max(1, int(length_s * sr))) / sr


def midi_to_hz(midi: int) -> float:
    """Equal-tempered frequency of a MIDI note (A4 = 69 = 440 Hz)."""
    return float(440.0 * 2.0 ** ((midi - 69) / 12))


def normalise(signal: Signal) -> Signal:
    """The signal scaled to a peak of 1 (silence stays silence)."""
    peak = float(np.max(np.abs(signal))) if len(signal) else 0.0
    return signal / peak if peak > 0 else signal


def add_at(out: Signal, event: Signal, start: int) -> None:
    """Mix ``event`` into ``out`` at ``start``, cut at the end of ``out``."""
    if start >= len(out):
        return
    length = min(len(event), len(out) - start)
    out[start : start + length] += event[:length]


def noise(ctx: Context, low_hz: float, high_hz: float, tilt_db_per_octave: float = 0.0) -> Signal:
    """Band-limited noise shaped in the frequency domain (gentle 2nd-order edges)."""
    spectrum = np.fft.rfft(ctx.rng.standard_normal(ctx.frames))
    hz = np.maximum(np.fft.rfftfreq(ctx.frames, 1.0 / ctx.sample_rate), 1.0)
    shape = 1.0 / np.sqrt((1 + (low_hz / hz) ** 4) * (1 + (hz / high_hz) ** 4))
    shape *= (hz / 1000.0) ** (tilt_db_per_octave / 6.02)
    return normalise(np.fft.irfft(spectrum * shape, ctx.frames))


def slow_envelope(ctx: Context, rate_hz: float) -> Signal:
    """A smooth random curve in [0, 1] with about ``rate_hz`` changes per second."""
    points = max(2, int(ctx.duration_s * rate_hz) + 2)
    knots_x = np.linspace(0, ctx.frames, points)
    knots_y = ctx.rng.random(points)
    curve = np.interp(np.arange(ctx.frames), knots_x, knots_y)
    return np.asarray(0.5 - 0.5 * np.cos(np.pi * curve))  # eases the corners


def onsets(ctx: Context, rate_hz: float, minimum: int = 0) -> list[float]:
    """Random event times (seconds): about ``rate_hz`` per second, at least ``minimum``,
    the first one early so that short clips still hear it."""
    count = max(minimum, int(ctx.rng.poisson(rate_hz * ctx.duration_s * min(ctx.temperature, 3.0))))
    times = np.sort(ctx.rng.uniform(0.0, ctx.duration_s, count))
    if count:
        times[0] = min(times[0], ctx.rng.uniform(0.0, min(0.3, ctx.duration_s / 4)))
    return [float(x) for x in times]


def scatter(ctx: Context, rate_hz: float, make: Callable[[np.random.Generator], Signal]) -> Signal:
    """Events made by ``make`` at random onsets (see :func:`onsets`), random levels."""
    out = np.zeros(ctx.frames)
    for onset_s in onsets(ctx, rate_hz, minimum=1):
        add_at(out, make(ctx.rng) * ctx.rng.uniform(0.3, 1.0), int(onset_s * ctx.sample_rate))
    return out


def tone(hz: float, length_s: float, sr: int, timbre: Timbre) -> Signal:
    """An additive note: partials with their own decays, an attack and a release."""
    t = time_axis(length_s, sr)
    top_hz = 0.45 * sr
    per_partial = np.exp(-timbre.decay_slope_per_s * t).astype(np.float32)
    fade = per_partial.copy()  # per_partial ** k
    signal = np.zeros(len(t), dtype=np.float32)
    if timbre.ratios is None:
        # sin(k x) by the Chebyshev recurrence: one sine per note instead of one per partial.
        cycles = hz * t
        twice_cos = 2 * cos_cycles(cycles)
        previous, current = np.zeros(len(t), dtype=np.float32), sin_cycles(cycles)
        for k, amp in enumerate(timbre.amps, start=1):
            if hz * k >= top_hz:
                break
            signal += np.float32(amp) * fade * current
            previous, current = current, twice_cos * current - previous
            fade *= per_partial
    else:
        for ratio, amp in zip(timbre.ratios, timbre.amps, strict=True):
            if hz * ratio < top_hz:
                signal += np.float32(amp) * fade * sin_cycles(hz * ratio * t)
            fade *= per_partial
    envelope = np.exp(-timbre.decay_per_s * t) * np.minimum(1.0, t / max(timbre.attack_s, 1.0 / sr))
    release = min(len(t), int(timbre.release_s * sr))
    if release > 0:
        envelope[-release:] *= np.linspace(1.0, 0.0, release)
    return np.asarray(signal * envelope, dtype=np.float64)


def sin_cycles(cycles: Signal) -> npt.NDArray[np.float32]:
    """sin(2π·cycles). The whole cycles are dropped in float64 so that float32, whose
    vectorised sine is many times faster, keeps full precision on long notes."""
    fraction = (cycles - np.floor(cycles)).astype(np.float32)
    sine: npt.NDArray[np.float32] = np.sin(np.float32(2 * np.pi) * fraction)
    return sine


def cos_cycles(cycles: Signal) -> npt.NDArray[np.float32]:
    """cos(2π·cycles), as :func:`sin_cycles`."""
    fraction = (cycles - np.floor(cycles)).astype(np.float32)
    cosine: npt.NDArray[np.float32] = np.cos(np.float32(2 * np.pi) * fraction)
    return cosine


def ping(sr: int, hz: float, decay_s: float, length_s: float) -> Signal:
    """A decaying sine: a drop, a ping."""
    t = time_axis(length_s, sr)
    return np.asarray(np.sin(2 * np.pi * hz * t) * np.exp(-t / decay_s))


def chirp(sr: int, start_hz: float, end_hz: float, length_s: float) -> Signal:
    """A windowed sine gliding from ``start_hz`` to ``end_hz``."""
    t = time_axis(length_s, sr)
    hz = np.geomspace(start_hz, end_hz, len(t))
    window = np.sin(np.pi * np.linspace(0.0, 1.0, len(t)))
    return np.asarray(np.sin(2 * np.pi * np.cumsum(hz) / sr) * window)


def click(ctx: Context, rng: np.random.Generator, length_s: float = 0.003) -> Signal:
    """A short burst of differentiated noise at a heavy-tailed random level."""
    t = time_axis(length_s, ctx.sample_rate)
    burst = np.diff(rng.standard_normal(len(t) + 1)) * np.exp(-t / (length_s / 3))
    return np.asarray(burst * rng.pareto(3.0))


def bark(sr: int, pitch_hz: float, length_s: float) -> Signal:
    """A harmonic burst with a rising-falling pitch and a formant near 1.2 kHz."""
    t = time_axis(length_s, sr)
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


def meow(sr: int, pitch_hz: float, length_s: float) -> Signal:
    """A pitch glide up and down whose formant slides from 'ee' to 'ow'."""
    t = time_axis(length_s, sr)
    position = t / length_s
    contour = pitch_hz * (1.0 + 0.5 * np.sin(np.pi * position**0.7))
    formant_hz = 2600.0 - 1700.0 * position
    phase = 2 * np.pi * np.cumsum(contour) / sr
    out = np.zeros(len(t))
    for k in range(1, 12):
        gain = np.exp(-(((contour * k - formant_hz) / 900.0) ** 2)) + 0.2 / k
        out += gain * np.sin(k * phase) * (contour * k < 0.45 * sr)
    return np.asarray(out * np.sin(np.pi * position) ** 0.8)
