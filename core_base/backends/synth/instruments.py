"""The timbres the synth plays notes with (piano, guitar, synth, bell, pad, bass)."""

from __future__ import annotations

import math

from core_base.backends.synth.dsp import Timbre


def harmonic(
    count: int, tilt: float, decay: float, decay_slope: float, attack_s: float, release_s: float
) -> Timbre:
    """Partials 1..count with amplitudes 1/k**tilt."""
    amps = tuple(1.0 / k**tilt for k in range(1, count + 1))
    return Timbre(amps, decay, decay_slope, attack_s, release_s)


TIMBRES: dict[str, Timbre] = {
    "piano": harmonic(8, 1.3, 1.2, 0.7, 0.004, 0.08),
    # Plucked near a fifth of the string: that partial series, fast-dying highs.
    "guitar": Timbre(
        tuple(abs(math.sin(math.pi * k * 0.22)) / k for k in range(1, 11)), 2.0, 1.4, 0.002, 0.05
    ),
    "synth": harmonic(12, 1.0, 0.3, 0.05, 0.01, 0.05),
    "bell": Timbre((1.0, 0.5, 0.25, 0.12), 0.5, 1.8, 0.002, 0.1, ratios=(1.0, 2.76, 5.4, 8.93)),
    "pad": harmonic(6, 1.4, 0.0, 0.05, 0.35, 0.4),
    "bass": harmonic(5, 1.6, 0.8, 0.4, 0.008, 0.06),
}
