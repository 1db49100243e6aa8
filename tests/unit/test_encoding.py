"""Encoding to wav/flac/mp3 and reading back (core_base.audio.encoding)."""

from __future__ import annotations

import numpy as np
import pytest

from core_base.audio.encoding import decode, encode, mp3_bitrate_kbps, playing_time_s, probe
from core_base.domain import AudioFormat
from core_base.generation.models import GeneratedAudio
from core_base.generation.worker import _encodes_at_once

# MPEG Layer III: sample-rate table per version bits (MPEG-1, MPEG-2, MPEG-2.5).
_MPEG_RATES = {3: (44100, 48000, 32000), 2: (22050, 24000, 16000), 0: (11025, 12000, 8000)}


def _audio(sample_rate: int, channels: int, duration_s: float = 1.5) -> GeneratedAudio:
    frames = round(duration_s * sample_rate)
    t = np.arange(frames) / sample_rate
    rows = [0.6 * np.sin(2 * np.pi * (330.0 + 110.0 * c) * t) for c in range(channels)]
    return GeneratedAudio(np.asarray(rows, dtype=np.float32), sample_rate)


@pytest.mark.parametrize("fmt", [AudioFormat.WAV, AudioFormat.FLAC])
@pytest.mark.parametrize(("sample_rate", "channels"), [(16_000, 1), (32_000, 1), (32_000, 2)])
def test_lossless_round_trip_keeps_length_rate_channels_and_samples(
    fmt: AudioFormat, sample_rate: int, channels: int
) -> None:
    audio = _audio(sample_rate, channels)

    samples, rate = decode(encode(audio, fmt))

    assert rate == sample_rate
    assert samples.shape == audio.samples.shape
    assert samples.dtype == np.float32
    # 16-bit PCM: one quantisation step of error at most.
    assert np.max(np.abs(samples - audio.samples)) <= 1.5 / 32767


@pytest.mark.parametrize("fmt", list(AudioFormat))
def test_probe_reports_what_was_encoded(fmt: AudioFormat) -> None:
    audio = _audio(32_000, 2, duration_s=2.0)

    info = probe(encode(audio, fmt), fmt)

    assert info.sample_rate == 32_000
    assert info.channels == 2
    assert info.duration_s == pytest.approx(2.0)
    assert info.frames == 64_000


def test_wav_size_is_header_plus_16_bit_samples() -> None:
    data = encode(_audio(16_000, 1, duration_s=5.0), AudioFormat.WAV)

    assert data[:4] == b"RIFF" and data[8:12] == b"WAVE"
    assert len(data) == 44 + 5 * 16_000 * 2  # the SPEC's example: 160044 bytes


def test_flac_is_smaller_than_wav() -> None:
    audio = _audio(32_000, 1)

    flac = encode(audio, AudioFormat.FLAC)

    assert flac[:4] == b"fLaC"
    assert len(flac) < len(encode(audio, AudioFormat.WAV))


def test_samples_beyond_full_scale_are_clipped_not_wrapped() -> None:
    loud = GeneratedAudio(np.array([[1.8, -1.8, 0.5, 3.0]], dtype=np.float32), 16_000)

    samples, _ = decode(encode(loud, AudioFormat.WAV))

    assert np.all(np.abs(samples) <= 1.0)
    assert samples[0, 0] > 0.99 and samples[0, 1] < -0.99 and samples[0, 3] > 0.99


@pytest.mark.parametrize(
    ("sample_rate", "channels"), [(16_000, 1), (32_000, 1), (16_000, 2), (32_000, 2)]
)
def test_mp3_has_valid_frames_at_the_source_rate(sample_rate: int, channels: int) -> None:
    duration_s = 3.0
    audio = _audio(sample_rate, channels, duration_s)

    data = encode(audio, AudioFormat.MP3)

    header = int.from_bytes(data[:4], "big")
    assert header >> 21 == 0x7FF, "frame sync"
    assert (header >> 17) & 0b11 == 0b01, "Layer III"
    version = (header >> 19) & 0b11
    assert _MPEG_RATES[version][(header >> 10) & 0b11] == sample_rate
    channel_mode = (header >> 6) & 0b11
    assert (channel_mode == 0b11) == (channels == 1)
    # Constant bitrate: the size follows from the bitrate (within the last frame).
    expected_bytes = mp3_bitrate_kbps(sample_rate, channels) * 1000 / 8 * duration_s
    assert 0.9 * expected_bytes <= len(data) <= 1.15 * expected_bytes


@pytest.mark.parametrize(("sample_rate", "channels"), [(16_000, 1), (32_000, 2)])
def test_mp3_decodes_to_the_source_length_in_step_and_at_its_level(
    sample_rate: int, channels: int
) -> None:
    audio = _audio(sample_rate, channels, duration_s=2.0)
    frames = audio.samples.shape[1]
    audio.samples[:, : frames // 4] = 0.0  # a sine that starts on a cue
    audio.samples[:, frames // 4] = 0.9

    samples, rate = decode(encode(audio, AudioFormat.MP3))

    assert rate == sample_rate
    # The codec's delay and padding are cut off again (gapless Info frame).
    assert samples.shape == audio.samples.shape
    correlation = np.correlate(samples[0], audio.samples[0], "full")
    assert int(np.argmax(correlation)) - (frames - 1) == 0, "decoded audio is shifted"
    source_rms = float(np.sqrt(np.mean(audio.samples**2)))
    decoded_rms = float(np.sqrt(np.mean(samples**2)))
    assert decoded_rms == pytest.approx(source_rms, rel=0.15)


def test_mp3_bitrates_are_valid_for_their_mpeg_version() -> None:
    mpeg2 = {8, 16, 24, 32, 40, 48, 56, 64, 80, 96, 112, 128, 144, 160}
    mpeg1 = {32, 40, 48, 56, 64, 80, 96, 112, 128, 160, 192, 224, 256, 320}
    assert mp3_bitrate_kbps(16_000, 1) in mpeg2
    assert mp3_bitrate_kbps(16_000, 2) in mpeg2
    assert mp3_bitrate_kbps(32_000, 1) in mpeg1
    assert mp3_bitrate_kbps(32_000, 2) in mpeg1


def test_probe_refuses_bytes_of_another_format() -> None:
    data = encode(_audio(16_000, 1), AudioFormat.WAV)

    with pytest.raises(ValueError, match="flac"):
        probe(data, AudioFormat.FLAC)


def test_encode_refuses_samples_without_a_channel_axis() -> None:
    flat = GeneratedAudio(np.zeros(100, dtype=np.float32), 16_000)

    with pytest.raises(ValueError, match="channels, frames"):
        encode(flat, AudioFormat.WAV)


@pytest.mark.parametrize("fmt", list(AudioFormat))
@pytest.mark.parametrize("duration_s", [0.02, 1.333, 3.0])
def test_the_playing_time_reported_is_what_a_decoder_finds(
    fmt: AudioFormat, duration_s: float
) -> None:
    """The duration a result states is the file's, as a client's player finds it:
    for mp3 too, the audio's own length (no codec delay or padding)."""
    audio = _audio(16_000, 1, duration_s)
    data = encode(audio, fmt)

    samples, rate = decode(data)

    assert playing_time_s(audio, data, fmt) == pytest.approx(samples.shape[1] / rate)
    assert playing_time_s(audio, data, fmt) == pytest.approx(audio.duration_s)


@pytest.mark.parametrize(
    ("fmt", "sample_rate", "channels", "duration_s", "at_once"),
    [
        (AudioFormat.WAV, 16_000, 1, 1.0, True),  # a short sound: no trip to a thread
        (AudioFormat.WAV, 16_000, 1, 3.0, True),
        (AudioFormat.WAV, 32_000, 2, 1.0, False),  # 64,000 samples: too long for the loop
        (AudioFormat.WAV, 16_000, 1, 30.0, False),
        (AudioFormat.FLAC, 16_000, 1, 1.0, False),  # compressing costs three times as much
        (AudioFormat.MP3, 16_000, 1, 1.0, False),
    ],
)
def test_only_short_wavs_are_encoded_on_the_event_loop(
    fmt: AudioFormat, sample_rate: int, channels: int, duration_s: float, at_once: bool
) -> None:
    assert _encodes_at_once([(_audio(sample_rate, channels, duration_s), fmt)]) is at_once


def test_a_batch_is_encoded_on_the_event_loop_only_if_all_of_it_is_short() -> None:
    """The batch's encodings follow one another on the loop: their sum counts."""
    second = (_audio(16_000, 1, 1.0), AudioFormat.WAV)
    assert _encodes_at_once([second, second]) is True
    assert _encodes_at_once([second] * 4) is False  # 64,000 samples in all
    assert _encodes_at_once([second, (_audio(16_000, 1, 1.0), AudioFormat.FLAC)]) is False
    # A failed result encodes nothing, whatever its format.
    failed = (RuntimeError("out of memory"), AudioFormat.MP3)
    assert _encodes_at_once([second, failed]) is True
