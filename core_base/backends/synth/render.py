"""Render one item: seed from the prompt and params, plan the layers, mix them."""

from __future__ import annotations

import hashlib
import math
import re

import numpy as np
import numpy.typing as npt

from core_base.backends.synth.context import Context, Layer
from core_base.backends.synth.dsp import normalise
from core_base.backends.synth.music import music_style
from core_base.backends.synth.plan import plan
from core_base.generation.models import GenerationItem, frame_count

# Bump when the generated samples change, so that reproducibility records stay honest.
SYNTH_VERSION = "1"
# Master peak: about -1 dBFS leaves room for codecs' overshoot.
MASTER_PEAK = 0.89
# Short fades at both ends so that no clip starts or stops with a click.
EDGE_FADE_S = 0.01


def synthesize(
    item: GenerationItem, *, sample_rate: int, channels: int, music: bool
) -> npt.NDArray[np.float32]:
    """Render one item: float32 samples in [-1, 1], shape (channels, frames)."""
    frames = frame_count(item.duration_s, sample_rate)
    prompt = " ".join(item.prompt.split())
    # Any change of the text changes the audio; keywords ignore case.
    prompt_seed = _digest_words(prompt)
    params_seed = _digest_words(item.params.model_dump_json())
    ctx = Context(
        frames=frames,
        sample_rate=sample_rate,
        rng=np.random.default_rng([*prompt_seed, item.seed % 2**64, *params_seed]),
        style=np.random.default_rng(prompt_seed),
        words=frozenset(re.findall(r"[a-z0-9]+", prompt.lower())),
        temperature=item.params.temperature if item.params.temperature is not None else 1.0,
    )
    ctx.music = music_style(ctx)
    layers: list[Layer] = []
    for layer_fn in plan(ctx.words, music=music, style=ctx.style):
        layers.extend(layer_fn(ctx))
    return _mix(layers, frames, channels, sample_rate)


def _digest_words(text: str) -> list[int]:
    """Four 32-bit words of the text's SHA-256: a seed stable across processes
    (unlike ``hash()``)."""
    digest = hashlib.sha256(text.encode("utf-8")).digest()
    return [int.from_bytes(digest[i : i + 4], "little") for i in range(0, 16, 4)]


def _mix(
    layers: list[Layer], frames: int, channels: int, sample_rate: int
) -> npt.NDArray[np.float32]:
    """Sum the layers (each at its peak times its weight), pan, fade the edges,
    and scale the whole to :data:`MASTER_PEAK`."""
    out = np.zeros((channels, frames))
    for layer in layers:
        signal = normalise(layer.signal[:frames]) * layer.weight
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
