"""The synth's sound textures and events: rain, water, wind, fire, thunder, dog,
cat, birds, engine, siren, crowd, footsteps, and for prompts without a known
word a coloured texture with pings; sound services add a quiet room tone."""

from __future__ import annotations

import numpy as np

from core_base.backends.synth import dsp
from core_base.backends.synth.context import Context, Layer
from core_base.backends.synth.instruments import TIMBRES


def rain(ctx: Context) -> list[Layer]:
    """Rain: a bright noise bed and scattered drops."""
    bed = dsp.noise(ctx, 700.0, ctx.top_hz, tilt_db_per_octave=-1.5)
    rate_hz = float(ctx.style.uniform(25, 60))
    drops = dsp.scatter(
        ctx,
        rate_hz,
        lambda rng: dsp.ping(
            ctx.sample_rate, rng.uniform(1500, min(5000, ctx.top_hz)), 0.004, 0.02
        ),
    )
    return [Layer(bed, 0.55, pan=-0.2), Layer(drops, 0.45, pan=0.3)]


def water(ctx: Context) -> list[Layer]:
    """Water: swelling low noise; streams and bubbles add blips."""
    bed = dsp.noise(ctx, 60.0, 1200.0, tilt_db_per_octave=-3.0)
    swell = 0.35 + 0.65 * dsp.slow_envelope(ctx, rate_hz=0.15) ** 2  # waves come and go
    layers = [Layer(bed * swell, 0.8)]
    if ctx.words & {"stream", "brook", "creek", "bubbling", "bubbles", "river", "fountain"}:
        blips = dsp.scatter(
            ctx,
            12.0,
            lambda rng: dsp.chirp(
                ctx.sample_rate, rng.uniform(300, 500), rng.uniform(700, 1200), 0.03
            ),
        )
        layers.append(Layer(blips, 0.35, pan=0.3))
    return layers


def wind(ctx: Context) -> list[Layer]:
    """Wind: three noise bands, each gusting at its own rate."""
    base_hz = float(ctx.style.uniform(180, 320))
    out = np.zeros(ctx.frames)
    for factor in (1.0, 2.3, 5.0):
        band = dsp.noise(ctx, base_hz * factor * 0.7, base_hz * factor * 1.4)
        out += band * dsp.slow_envelope(ctx, rate_hz=0.4 * factor) ** 2 / factor
    return [Layer(out, 0.8)]


def fire(ctx: Context) -> list[Layer]:
    """Fire: a low rumble and crackles."""
    rumble = dsp.noise(ctx, 30.0, 400.0, tilt_db_per_octave=-6.0)
    crackles = dsp.scatter(ctx, float(ctx.style.uniform(6, 15)), lambda rng: dsp.click(ctx, rng))
    return [Layer(rumble, 0.4), Layer(crackles, 0.9, pan=0.2)]


def thunder(ctx: Context) -> list[Layer]:
    """Thunder: a deep rumble that swells at each clap."""
    rumble = dsp.noise(ctx, 20.0, 250.0, tilt_db_per_octave=-6.0)
    envelope = 0.15 + np.zeros(ctx.frames)
    t = np.arange(ctx.frames) / ctx.sample_rate
    for onset_s in dsp.onsets(ctx, rate_hz=0.15, minimum=1):
        after = t - onset_s
        envelope += np.where(
            after >= 0, np.exp(-np.clip(after, 0, None) / ctx.rng.uniform(0.8, 2.0)), 0.0
        )
    return [Layer(rumble * envelope, 1.0)]


def dog(ctx: Context) -> list[Layer]:
    """A dog: barks in runs of one to three."""
    pitch_hz = float(ctx.style.uniform(300, 600))
    out = np.zeros(ctx.frames)
    for onset_s in dsp.onsets(ctx, rate_hz=0.8, minimum=1):
        for repeat in range(int(ctx.rng.integers(1, 4))):
            bark = dsp.bark(
                ctx.sample_rate, pitch_hz * ctx.rng.uniform(0.9, 1.1), ctx.rng.uniform(0.12, 0.22)
            )
            dsp.add_at(out, bark, int((onset_s + repeat * 0.28) * ctx.sample_rate))
    return [Layer(out, 1.0, pan=-0.2)]


def cat(ctx: Context) -> list[Layer]:
    """A cat: meows."""
    pitch_hz = float(ctx.style.uniform(420, 620))
    out = np.zeros(ctx.frames)
    for onset_s in dsp.onsets(ctx, rate_hz=0.45, minimum=1):
        meow = dsp.meow(
            ctx.sample_rate, pitch_hz * ctx.rng.uniform(0.9, 1.1), ctx.rng.uniform(0.5, 0.9)
        )
        dsp.add_at(out, meow, int(onset_s * ctx.sample_rate))
    return [Layer(out, 1.0, pan=0.2)]


def birds(ctx: Context) -> list[Layer]:
    """Birds: one to three birds, each with its own chirp pitch."""
    layers = []
    for bird in range(int(ctx.style.integers(1, 4))):
        base_hz = min(float(ctx.style.uniform(2200, 4200)), ctx.top_hz / 1.6)
        out = np.zeros(ctx.frames)
        for onset_s in dsp.onsets(ctx, rate_hz=0.7, minimum=1):
            for note in range(int(ctx.rng.integers(2, 8))):
                rise = ctx.rng.uniform(1.2, 1.6)
                chirp = dsp.chirp(
                    ctx.sample_rate, base_hz, base_hz * rise, ctx.rng.uniform(0.04, 0.1)
                )
                dsp.add_at(out, chirp, int((onset_s + note * 0.09) * ctx.sample_rate))
        layers.append(Layer(out, 0.8, pan=-0.5 + 0.5 * bird))
    return layers


def engine(ctx: Context) -> list[Layer]:
    """An engine: a buzz at a wavering firing rate over low noise."""
    firing_hz = float(ctx.style.uniform(25, 50)) * (1 + 0.05 * (dsp.slow_envelope(ctx, 0.3) - 0.5))
    cycles = np.cumsum(firing_hz) / ctx.sample_rate
    buzz = np.zeros(ctx.frames, dtype=np.float32)
    for k in range(1, 16):
        buzz += dsp.sin_cycles(k * cycles) / np.float32(k)
    return [Layer(buzz.astype(np.float64), 0.7), Layer(dsp.noise(ctx, 40.0, 900.0, -3.0), 0.3)]


def siren(ctx: Context) -> list[Layer]:
    """A siren: a tone sweeping up and down."""
    period_s = float(ctx.style.uniform(1.0, 3.0))
    t = np.arange(ctx.frames) / ctx.sample_rate
    cycles = np.cumsum(950.0 + 350.0 * dsp.sin_cycles(t / period_s)) / ctx.sample_rate
    tone = (
        dsp.sin_cycles(cycles) + 0.4 * dsp.sin_cycles(2 * cycles) + 0.2 * dsp.sin_cycles(3 * cycles)
    )
    return [Layer(tone.astype(np.float64), 0.7)]


def crowd(ctx: Context) -> list[Layer]:
    """A crowd: six babbling voices; clapping words add claps."""
    out = np.zeros(ctx.frames)
    speech_band = dsp.noise(ctx, 250.0, min(3500.0, ctx.top_hz))
    for _ in range(6):
        # Six voices, each a syllable-rate burst of speech-band noise; shifting one
        # noise decorrelates the voices at a sixth of the cost of six noises.
        voice = np.roll(speech_band, int(ctx.rng.integers(ctx.frames)))
        out += voice * dsp.slow_envelope(ctx, rate_hz=float(ctx.rng.uniform(4, 7))) ** 3
    layers = [Layer(out, 0.7)]
    if ctx.words & {"applause", "clapping", "claps", "clap"}:
        claps = dsp.scatter(ctx, 25.0, lambda rng: dsp.click(ctx, rng, length_s=0.012))
        layers.append(Layer(claps, 0.8, pan=0.2))
    return layers


def steps(ctx: Context) -> list[Layer]:
    """Footsteps: thumps at a walking pace."""
    interval_s = float(ctx.style.uniform(0.45, 0.65))
    thump = dsp.tone(float(ctx.style.uniform(90, 160)), 0.08, ctx.sample_rate, TIMBRES["bass"])
    out = np.zeros(ctx.frames)
    for index in range(int(ctx.duration_s / interval_s) + 1):
        start_s = index * interval_s + ctx.rng.normal(0, 0.015 * ctx.temperature)
        dsp.add_at(out, thump * ctx.rng.uniform(0.6, 1.0), max(0, int(start_s * ctx.sample_rate)))
    return [Layer(out + 0.1 * dsp.noise(ctx, 60.0, 400.0), 1.0)]


def texture(ctx: Context) -> list[Layer]:
    """A prompt without known words: noise coloured by the prompt's hash."""
    low_hz = float(ctx.style.uniform(60, 1200))
    high_hz = min(low_hz * float(ctx.style.uniform(2, 8)), ctx.top_hz)
    bed = dsp.noise(ctx, low_hz, high_hz, float(ctx.style.uniform(-6, 0)))
    return [Layer(bed * (0.4 + 0.6 * dsp.slow_envelope(ctx, 0.25)), 0.6)]


def pings(ctx: Context) -> list[Layer]:
    """Bell pings at the prompt's pitch, with the texture of an unknown prompt."""
    pitch_hz = min(float(ctx.style.uniform(300, 2000)), ctx.top_hz / 3)
    out = dsp.scatter(
        ctx,
        1.0,
        lambda rng: dsp.tone(
            pitch_hz * rng.choice([1.0, 1.25, 1.5]), 0.4, ctx.sample_rate, TIMBRES["bell"]
        ),
    )
    return [Layer(out, 0.5, pan=0.3)]


def room_tone(ctx: Context) -> list[Layer]:
    """A quiet noise floor under every sound service's output."""
    return [Layer(dsp.noise(ctx, 40.0, min(6000.0, ctx.top_hz), -3.0), 0.04)]
