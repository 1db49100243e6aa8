"""The gapless-playback header of an mp3: an "Info" frame with LAME's tag.

An mp3 decodes longer than its source: the encoder starts with a delay (LAME's
is 576 samples), pads the end to whole frames (1152 samples at MPEG-1 rates, 576
at MPEG-2 ones), and the decoder adds its own delay. Without a word on it, a
client asking for 1 s of sound gets up to ~80 ms of silence around it, and a
sound effect no longer starts on its cue. LAME writes that word in the tag of a
silent first frame (the "Info" frame of a constant-bitrate file): the encoder
delay and the padding, which decoders that play gaplessly (mpg123, hence
libsndfile; FFmpeg, hence browsers; mutagen's length) cut off again. ``lameenc``
does not write the frame (it streams), so this module builds it from the encoded
frames and the source's length.

Layout (LAME's "Mp3 Info Tag rev 1" specification): the frame header, zeroed side
information, then ``Info``, the flags for the four optional fields (frames,
bytes, seek table, quality), those fields, and LAME's 36-byte extension, which
ends with a CRC-16 of the frame's first 190 bytes.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

# LAME's encoder delay (ENCDELAY in its source): the samples it emits before the
# first one of the input.
ENCODER_DELAY = 576

_SYNC = 0x7FF
_LAYER_III = 0b01
_MPEG1 = 0b11
# By MPEG version bits (1: reserved) and sample-rate index (3: reserved).
_SAMPLE_RATES = {
    0b11: (44_100, 48_000, 32_000),
    0b10: (22_050, 24_000, 16_000),
    0b00: (11_025, 12_000, 8_000),  # MPEG-2.5
}
# Layer III bitrates (kbit/s) by index; 0 is "free format", 15 is invalid.
_BITRATES_MPEG1 = (0, 32, 40, 48, 56, 64, 80, 96, 112, 128, 160, 192, 224, 256, 320)
_BITRATES_MPEG2 = (0, 8, 16, 24, 32, 40, 48, 56, 64, 80, 96, 112, 128, 144, 160)

_INFO_FLAGS = 0x0F  # frames, bytes, seek table and quality all present
_INFO_FIELDS_SIZE = 4 + 4 + 4 + 4 + 100 + 4  # "Info", flags, frames, bytes, table, quality
_LAME_TAG_SIZE = 36
_LAME_VERSION = b"LAME3.100"  # lameenc's LAME; decoders look for the "LAME" prefix
_CBR_METHOD = 1  # tag revision 0, VBR method 1: constant bitrate
_MAX_12_BITS = 0xFFF


@dataclass(frozen=True)
class _Header:
    """The fields of an MPEG audio frame header that size a Layer III frame."""

    word: int
    mpeg1: bool
    sample_rate: int
    bitrate_kbps: int
    mono: bool

    @classmethod
    def parse(cls, data: bytes, at: int) -> _Header:
        if at + 4 > len(data):
            raise ValueError(f"truncated mp3 frame header at byte {at}")
        word = struct.unpack_from(">I", data, at)[0]
        version, layer = (word >> 19) & 0b11, (word >> 17) & 0b11
        rate_index, bitrate_index = (word >> 10) & 0b11, (word >> 12) & 0b1111
        if (
            word >> 21 != _SYNC
            or layer != _LAYER_III
            or version not in _SAMPLE_RATES
            or rate_index == 0b11
            or bitrate_index in (0, 0b1111)
        ):
            raise ValueError(f"no Layer III frame header at byte {at}")
        mpeg1 = version == _MPEG1
        bitrates = _BITRATES_MPEG1 if mpeg1 else _BITRATES_MPEG2
        return cls(
            word=word,
            mpeg1=mpeg1,
            sample_rate=_SAMPLE_RATES[version][rate_index],
            bitrate_kbps=bitrates[bitrate_index],
            mono=(word >> 6) & 0b11 == 0b11,
        )

    @property
    def samples_per_frame(self) -> int:
        return 1152 if self.mpeg1 else 576

    @property
    def padded(self) -> bool:
        return bool((self.word >> 9) & 1)

    @property
    def frame_size(self) -> int:
        slot_bytes = self.samples_per_frame // 8  # 144 (MPEG-1) or 72 bytes per kbit/s / rate
        return slot_bytes * self.bitrate_kbps * 1000 // self.sample_rate + int(self.padded)

    @property
    def side_info_size(self) -> int:
        if self.mpeg1:
            return 17 if self.mono else 32
        return 9 if self.mono else 17

    def with_bitrate_index(self, index: int) -> _Header:
        """The same header without the padding slot, at another bitrate."""
        word = (self.word & ~(0b1111 << 12) & ~(1 << 9)) | (index << 12)
        bitrates = _BITRATES_MPEG1 if self.mpeg1 else _BITRATES_MPEG2
        return _Header(word, self.mpeg1, self.sample_rate, bitrates[index], self.mono)


def with_gapless_info(mp3: bytes, source_frames: int) -> bytes:
    """``mp3`` (a constant-bitrate LAME stream of ``source_frames`` samples per
    channel, without a tag) behind an Info frame that states its encoder delay and
    padding, so that it decodes to exactly ``source_frames`` samples."""
    first = _Header.parse(mp3, 0)
    frames = _count_frames(mp3)
    padding = frames * first.samples_per_frame - ENCODER_DELAY - source_frames
    if not 0 <= padding <= _MAX_12_BITS:
        raise ValueError(
            f"{frames} frames cannot hold {source_frames} samples after the encoder's delay"
        )
    header = _info_frame_header(first)
    frame = bytearray(header.frame_size)
    struct.pack_into(">I", frame, 0, header.word)
    at = 4 + header.side_info_size
    total_bytes = header.frame_size + len(mp3)
    struct.pack_into(">4sIII", frame, at, b"Info", _INFO_FLAGS, frames, total_bytes)
    # The seek table: byte position (in 256ths of the file) at each percent of the
    # playing time, a straight line at a constant bitrate.
    frame[at + 16 : at + 116] = bytes(percent * 256 // 100 for percent in range(100))
    # The quality field (at + 116) stays 0, as LAME writes it for CBR.
    at += _INFO_FIELDS_SIZE
    frame[at : at + 9] = _LAME_VERSION
    frame[at + 9] = _CBR_METHOD
    frame[at + 20] = min(first.bitrate_kbps, 255)
    frame[at + 21 : at + 24] = ((ENCODER_DELAY << 12) | padding).to_bytes(3, "big")
    struct.pack_into(">I", frame, at + 28, total_bytes)  # "music length": the whole file
    # The music CRC (at + 32) stays 0: no decoder reads it, and a CRC of the whole
    # stream in Python would cost more than the encoding.
    struct.pack_into(">H", frame, at + 34, crc16(bytes(frame[: at + 34])))
    return bytes(frame) + mp3


def _count_frames(mp3: bytes) -> int:
    frames, at = 0, 0
    while at < len(mp3):
        at += _Header.parse(mp3, at).frame_size
        frames += 1
    if at != len(mp3):
        raise ValueError("the mp3 stream ends inside a frame")
    return frames


def _info_frame_header(first: _Header) -> _Header:
    """The Info frame's header: the stream's own, at the lowest bitrate whose frame
    holds the tag (the stream's bitrate, unless that is very low)."""
    needed = 4 + first.side_info_size + _INFO_FIELDS_SIZE + _LAME_TAG_SIZE
    bitrates = _BITRATES_MPEG1 if first.mpeg1 else _BITRATES_MPEG2
    stream_index = bitrates.index(first.bitrate_kbps)
    for index in range(stream_index, len(bitrates)):
        header = first.with_bitrate_index(index)
        if header.frame_size >= needed:
            return header
    raise ValueError("no Layer III frame is large enough for the Info tag")


def _crc16_table() -> tuple[int, ...]:
    table = []
    for byte in range(256):
        crc = byte
        for _ in range(8):
            crc = (crc >> 1) ^ 0xA001 if crc & 1 else crc >> 1
        table.append(crc)
    return tuple(table)


_CRC16_TABLE = _crc16_table()


def crc16(data: bytes) -> int:
    """CRC-16/ARC (reflected polynomial 0x8005, initial value 0): the LAME tag's."""
    crc = 0
    for byte in data:
        crc = (crc >> 8) ^ _CRC16_TABLE[(crc ^ byte) & 0xFF]
    return crc
