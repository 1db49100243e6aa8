"""The mp3 Info frame that makes players cut the codec's delay and padding
(core_base.audio.mp3_gapless), checked with two independent readers: libsndfile's
mpg123 decoder and mutagen's header parser."""

from __future__ import annotations

import io

import lameenc
import mutagen.mp3
import numpy as np
import pytest
import soundfile as sf

from core_base.audio.mp3_gapless import crc16, with_gapless_info

# Sample rates of all three MPEG versions, mono and stereo.
_LAYOUTS = [
    (8_000, 1),
    (16_000, 1),
    (16_000, 2),
    (24_000, 2),
    (32_000, 1),
    (32_000, 2),
    (48_000, 2),
]


def _clicks(sample_rate: int, channels: int, frames: int) -> np.ndarray:
    """Silence with a decaying tone from a quarter in: where it starts shows a shift."""
    samples = np.zeros((channels, frames))
    start = frames // 4
    t = np.arange(frames - start) / sample_rate
    samples[:, start:] = 0.5 * np.sin(2 * np.pi * 440 * t) * np.exp(-3 * t)
    samples[:, start] = 0.9
    return samples


def _lame_stream(samples: np.ndarray, sample_rate: int) -> bytes:
    channels = samples.shape[0]
    encoder = lameenc.Encoder()
    encoder.set_bit_rate(96 * channels if sample_rate >= 32_000 else 64 * channels)
    encoder.set_in_sample_rate(sample_rate)
    encoder.set_out_sample_rate(sample_rate)
    encoder.set_channels(channels)
    encoder.set_quality(2)
    pcm = np.round(samples.T * 32767).astype("<i2")
    return bytes(encoder.encode(pcm.tobytes())) + bytes(encoder.flush())


@pytest.mark.parametrize(("sample_rate", "channels"), _LAYOUTS)
@pytest.mark.parametrize("duration_s", [0.0001, 0.02, 1.337, 5.0])
def test_a_tagged_stream_decodes_to_its_source_exactly_in_step(
    sample_rate: int, channels: int, duration_s: float
) -> None:
    frames = max(1, round(duration_s * sample_rate))
    samples = _clicks(sample_rate, channels, frames)
    stream = _lame_stream(samples, sample_rate)

    decoded, rate = sf.read(io.BytesIO(with_gapless_info(stream, frames)), always_2d=True)

    untagged, _ = sf.read(io.BytesIO(stream), always_2d=True)
    assert len(untagged) > frames  # the codec's delay and padding, left in
    assert rate == sample_rate
    assert decoded.shape == (frames, channels)
    if frames >= 1_000:
        correlation = np.correlate(decoded[:, 0], samples[0], "full")
        assert int(np.argmax(correlation)) - (frames - 1) == 0, "decoded audio is shifted"


@pytest.mark.parametrize(("sample_rate", "channels"), _LAYOUTS)
def test_mutagen_reads_a_lame_cbr_tag_with_the_source_length(
    sample_rate: int, channels: int
) -> None:
    frames = round(2.5 * sample_rate) + 17
    stream = _lame_stream(_clicks(sample_rate, channels, frames), sample_rate)

    tagged = io.BytesIO(with_gapless_info(stream, frames))
    info = mutagen.mp3.MP3(tagged).info  # type: ignore[no-untyped-call]  # mutagen is untyped

    assert info is not None
    assert info.length * sample_rate == pytest.approx(frames, abs=1e-6)
    assert info.encoder_info.startswith("LAME 3.100")
    assert info.bitrate_mode == mutagen.mp3.BitrateMode.CBR
    assert info.sample_rate == sample_rate
    assert info.channels == channels
    assert not info.sketchy


def test_the_tag_crc_is_crc16_arc() -> None:
    assert crc16(b"123456789") == 0xBB3D  # the catalogued check value
    assert crc16(b"") == 0


@pytest.mark.parametrize(
    ("sample_rate", "channels", "crc_at"),
    [(32_000, 2, 190), (32_000, 1, 175), (16_000, 2, 175), (16_000, 1, 167)],
)
def test_the_tag_ends_with_the_crc_of_the_frame_before_it(
    sample_rate: int, channels: int, crc_at: int
) -> None:
    """At byte 190 in MPEG-1 stereo, as LAME's tag specification draws it; earlier
    where the side information is shorter."""
    stream = _lame_stream(_clicks(sample_rate, channels, sample_rate), sample_rate)

    tagged = with_gapless_info(stream, sample_rate)

    assert tagged.index(b"LAME3.100") + 34 == crc_at
    assert int.from_bytes(tagged[crc_at : crc_at + 2], "big") == crc16(tagged[:crc_at])


def test_a_stream_that_is_not_layer_iii_or_ends_inside_a_frame_is_refused() -> None:
    stream = _lame_stream(_clicks(16_000, 1, 16_000), 16_000)

    with pytest.raises(ValueError, match="no Layer III frame header"):
        with_gapless_info(b"RIFF" + stream, 16_000)
    with pytest.raises(ValueError, match="ends inside a frame"):
        with_gapless_info(stream[:-3], 16_000)


def test_a_length_the_frames_cannot_hold_is_refused() -> None:
    stream = _lame_stream(_clicks(16_000, 1, 16_000), 16_000)

    with pytest.raises(ValueError, match="cannot hold"):
        with_gapless_info(stream, 10 * 16_000)
