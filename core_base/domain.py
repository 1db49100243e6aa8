"""Plain typed domain data: kinds, formats, statuses and the limits of the input."""

from __future__ import annotations

from enum import StrEnum


class Kind(StrEnum):
    """What the marketplace asks for; each kind is served by one generation service."""

    SOUND = "sound"
    MUSIC = "music"


class AudioFormat(StrEnum):
    WAV = "wav"
    MP3 = "mp3"
    FLAC = "flac"

    @property
    def content_type(self) -> str:
        return _CONTENT_TYPES[self]


_CONTENT_TYPES = {
    AudioFormat.WAV: "audio/wav",
    AudioFormat.MP3: "audio/mpeg",
    AudioFormat.FLAC: "audio/flac",
}


class TaskStatus(StrEnum):
    """Status of a generation task and of a whole workflow."""

    QUEUED = "queued"
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELED = "canceled"

    @property
    def is_terminal(self) -> bool:
        """A terminal status never changes again."""
        return self in _TERMINAL


_TERMINAL = frozenset({TaskStatus.SUCCEEDED, TaskStatus.FAILED, TaskStatus.CANCELED})
