"""Encoding generated audio to wav, flac or mp3, and reading it back.

Plain synchronous CPU work: the worker calls these functions in a thread.
wav and flac are 16-bit PCM written by libsndfile (``soundfile``); mp3 is
constant-bitrate MPEG Layer III from LAME (``lameenc``) at the source's own
sample rate (16 kHz and 32 kHz are valid MPEG-2 / MPEG-1 rates, so nothing is
resampled), behind the Info frame that lets players cut the codec's delay and
padding off again (:mod:`core_base.audio.mp3_gapless`). Decoding uses libsndfile
for all three (it reads mp3 since 1.1, gaplessly).
"""

from __future__ import annotations

import io
from dataclasses import dataclass

import lameenc
import numpy as np
import numpy.typing as npt
import soundfile as sf

from core_base.audio.mp3_gapless import with_gapless_info
from core_base.domain import AudioFormat
from core_base.generation.models import GeneratedAudio

_SOUNDFILE_FORMATS = {AudioFormat.WAV: "WAV", AudioFormat.FLAC: "FLAC"}
# 16-bit PCM: what every player reads, and the models' output carries no more.
_PCM_SUBTYPE = "PCM_16"
_INT16_SCALE = 32767.0
# LAME quality 2 ("near best") costs little at our rates and lengths.
_MP3_QUALITY = 2


@dataclass(frozen=True)
class AudioInfo:
    """What an encoded file holds, read back from its bytes."""

    duration_s: float
    sample_rate: int
    channels: int
    frames: int


def encode(audio: GeneratedAudio, fmt: AudioFormat) -> bytes:
    """Encode ``audio`` (float32, shape (channels, frames)) as ``fmt``.

    Samples outside [-1, 1] are clipped rather than left to wrap around.
    """
    if audio.samples.ndim != 2 or audio.channels < 1:
        raise ValueError(f"expected samples of shape (channels, frames), got {audio.samples.shape}")
    fmt = AudioFormat(fmt)
    if fmt is AudioFormat.MP3:
        return _encode_mp3(audio)
    buffer = io.BytesIO()
    frames = np.clip(audio.samples, -1.0, 1.0).T
    sf.write(
        buffer,
        frames,
        audio.sample_rate,
        format=_SOUNDFILE_FORMATS[fmt],
        subtype=_PCM_SUBTYPE,
    )
    return buffer.getvalue()


def playing_time_s(audio: GeneratedAudio, data: bytes, fmt: AudioFormat) -> float:
    """How long ``data`` (``audio`` encoded as ``fmt``) plays: the audio's own length
    for wav and flac, which hold it sample for sample; for mp3, its decoded length,
    which is what a client's player reports (the same, played gaplessly)."""
    if AudioFormat(fmt) is AudioFormat.MP3:
        return probe(data, fmt).duration_s
    return audio.duration_s


def decode(data: bytes) -> tuple[npt.NDArray[np.float32], int]:
    """Decode wav, flac or mp3 bytes to float32 samples of shape (channels, frames)
    and the sample rate.

    An mp3 decodes to its source's length: its Info frame says how much of the
    codec's delay and padding to cut (:mod:`core_base.audio.mp3_gapless`).
    """
    samples, sample_rate = sf.read(io.BytesIO(data), dtype="float32", always_2d=True)
    return np.ascontiguousarray(samples.T), int(sample_rate)


def probe(data: bytes, fmt: AudioFormat) -> AudioInfo:
    """Duration, sample rate and channels of encoded bytes (for ``AudioOutput``).

    For mp3 the duration is the decoded length (see :func:`decode`).
    """
    expected = _SOUNDFILE_FORMATS.get(AudioFormat(fmt), "MP3")
    info = sf.info(io.BytesIO(data))
    if info.format != expected:
        raise ValueError(f"expected {fmt} data, found {info.format}")
    return AudioInfo(
        duration_s=float(info.frames) / info.samplerate,
        sample_rate=int(info.samplerate),
        channels=int(info.channels),
        frames=int(info.frames),
    )


def mp3_bitrate_kbps(sample_rate: int, channels: int) -> int:
    """Constant bitrate used for mp3.

    96 kbit/s per channel at MPEG-1 rates (32 kHz and up) is transparent enough
    for generated music; MPEG-2 rates (below 32 kHz, e.g. AudioGen's 16 kHz) top
    out at 160 kbit/s, and 64 kbit/s per channel is plenty for 8 kHz of bandwidth.
    """
    per_channel = 96 if sample_rate >= 32_000 else 64
    return min(per_channel * channels, 320 if sample_rate >= 32_000 else 160)


def _encode_mp3(audio: GeneratedAudio) -> bytes:
    if audio.channels > 2:
        raise ValueError(f"mp3 holds at most 2 channels, got {audio.channels}")
    pcm = np.round(np.clip(audio.samples, -1.0, 1.0) * _INT16_SCALE).astype("<i2")
    encoder = lameenc.Encoder()
    encoder.set_bit_rate(mp3_bitrate_kbps(audio.sample_rate, audio.channels))
    encoder.set_in_sample_rate(audio.sample_rate)
    # Without this LAME may pick a lower output rate for the bitrate.
    encoder.set_out_sample_rate(audio.sample_rate)
    encoder.set_channels(audio.channels)
    encoder.set_quality(_MP3_QUALITY)
    # lameenc takes interleaved 16-bit samples: (frames, channels) in C order.
    interleaved = np.ascontiguousarray(pcm.T).tobytes()
    stream = bytes(encoder.encode(interleaved)) + bytes(encoder.flush())
    return with_gapless_info(stream, source_frames=pcm.shape[1])
