"""Wire formats between the processes: the task message and the callback payload.

The App API sends a ``GenerateRequest`` to a sub-service API, which publishes it
as a ``TaskMessage``; the worker answers with a ``TaskResult`` posted to the
task's ``callback_url``. The same ``TaskResult`` is the sub-service's record in
Redis (``GET /v1/tasks/{id}``).
"""

from __future__ import annotations

import time
from typing import Annotated, Any
from urllib.parse import urlsplit

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, field_validator

from core_base.domain import AudioFormat, Kind, TaskStatus
from core_base.http.hosts import is_valid_host

# Upper bounds that no deployment setting can raise: they keep a single task
# within what one worker can hold in memory. The tighter, configurable limits
# (MAX_DURATION, MAX_PROMPT_LEN) are checked by the APIs against settings.
HARD_MAX_DURATION_S = 600.0
HARD_MAX_PROMPT_LEN = 2000

# C0, DEL and C1: no text a person types holds them.
CONTROL_CHARACTERS = frozenset(map(chr, [*range(0x20), *range(0x7F, 0xA0)]))
# Prompts may hold tabs and line breaks; no other control character.
_PROMPT_CONTROL = CONTROL_CHARACTERS - {"\t", "\n", "\r"}


def is_blank(text: str) -> bool:
    """Nothing a person can read: only spaces or invisible characters (zero-width
    spaces, ...), or nothing at all."""
    return not any(c.isprintable() and not c.isspace() for c in text)


def clean_prompt(value: str, max_len: int = HARD_MAX_PROMPT_LEN) -> str:
    """A prompt, trimmed: not blank, at most ``max_len`` characters after trimming,
    no control characters but tabs and line breaks (``ValueError``)."""
    if not _PROMPT_CONTROL.isdisjoint(value):
        raise ValueError("must not contain control characters other than tabs and line breaks")
    stripped = value.strip()
    if is_blank(stripped):
        raise ValueError("must not be blank")
    if len(stripped) > max_len:
        raise ValueError(f"must be at most {max_len} characters after trimming")
    return stripped


def http_url(value: str) -> str:
    """An http(s) URL with a host (``ValueError`` otherwise)."""
    try:
        parts = urlsplit(value)
        parts.port  # noqa: B018 - raises ValueError for a port out of range
    except ValueError:
        raise ValueError("must be an http(s) URL") from None
    blank = any(character.isspace() for character in value)
    if parts.scheme not in ("http", "https") or not parts.hostname or blank:
        raise ValueError("must be an http(s) URL with a host, like https://host:port")
    if not is_valid_host(parts.hostname):
        raise ValueError("must name a valid host")
    return value


HttpUrl = Annotated[str, AfterValidator(http_url)]


# Task ids and object keys travel into Redis keys, queue messages, PostgreSQL text
# and S3 keys: a plain alphabet keeps every one of them valid (PostgreSQL, for
# one, refuses a NUL character in text, and would answer a 500).
def not_a_relative_path_part(value: str) -> str:
    """A task id is a segment of its S3 key: "." or ".." would name another one
    (the storage refuses them, and a task could never finish)."""
    if value in (".", ".."):
        raise ValueError("must not be '.' or '..'")
    return value


TaskId = Annotated[
    str,
    Field(min_length=1, max_length=128, pattern=r"^[A-Za-z0-9_.:-]+$"),
    AfterValidator(not_a_relative_path_part),
]
ObjectKey = Annotated[str, Field(min_length=1, max_length=1024, pattern=r"^[A-Za-z0-9_.:/-]+$")]


MIN_TEMPERATURE = 0.01


class SamplingParams(BaseModel):
    """Sampling knobs of the language-model backends (AudioCraft's names and ranges).

    ``None`` means "the backend's default" (AudioCraft: top_k 250, top_p 0,
    temperature 1.0, cfg_coef 3.0).
    """

    # Strict: JSON numbers only ("5" and true are refused); NaN and infinities too.
    model_config = ConfigDict(extra="forbid", frozen=True, strict=True, allow_inf_nan=False)

    top_k: Annotated[int, Field(ge=0, le=2048)] | None = None
    top_p: Annotated[float, Field(ge=0.0, le=1.0)] | None = None
    # Not lower: logits divided by a smaller temperature overflow in half precision
    # (and below ~1e-38 even in fp32): AudioCraft's sampling then fails and ours
    # samples from NaNs. At 0.01 sampling is already all but greedy (top_k=1 is).
    temperature: Annotated[float, Field(ge=MIN_TEMPERATURE, le=10.0)] | None = None
    cfg_coef: Annotated[float, Field(ge=0.0, le=20.0)] | None = None


def _without_credentials(url: str) -> str:
    parts = urlsplit(url)
    if parts.username is not None or parts.password is not None:
        raise ValueError("must not contain credentials (the bearer token is sent)")
    return url


# A URL requests go to with a bearer token (the internal callback, the sub-service
# APIs): the HTTP client refuses credentials in the URL beside it.
BearerHttpUrl = Annotated[HttpUrl, AfterValidator(_without_credentials)]


class GenerateRequest(BaseModel):
    """Body of a sub-service's ``POST /v1/generate`` (internal)."""

    model_config = ConfigDict(extra="forbid")

    task_id: TaskId
    prompt: Annotated[str, Field(min_length=1), AfterValidator(clean_prompt)]
    # Strict: JSON numbers only, as the App API takes them.
    duration: Annotated[float, Field(gt=0.0, le=HARD_MAX_DURATION_S, strict=True)] = 5.0
    format: AudioFormat = AudioFormat.WAV
    seed: Annotated[int, Field(ge=0, le=2**32 - 1, strict=True)] | None = None
    params: SamplingParams = Field(default_factory=SamplingParams)
    callback_url: BearerHttpUrl | None = None


# Tasks per ``POST /v1/generate/batch`` (the App API's fan-out sends at most this many).
MAX_BATCH_TASKS = 100


class GenerateBatch(BaseModel):
    """Body of ``POST /v1/generate/batch``. Each task is validated on its own (as a
    ``GenerateRequest``), so one malformed task does not refuse its batch-mates; a
    ``task_id`` that appears twice refuses the whole batch (the API checks it)."""

    model_config = ConfigDict(extra="forbid")

    tasks: Annotated[list[dict[str, Any]], Field(min_length=1, max_length=MAX_BATCH_TASKS)]


class BatchItemResult(BaseModel):
    """One task's outcome in a batch: ``status`` when admitted (``queued``, or a
    duplicate's current status), else what ``POST /v1/generate`` would have
    answered for it: ``http_status``, ``error`` code, ``message`` and ``field``."""

    task_id: str | None
    status: TaskStatus | None = None
    http_status: int = 202
    error: str | None = None
    message: str | None = None
    field: str | None = None


class GenerateBatchResult(BaseModel):
    """Answer of ``POST /v1/generate/batch``: one result per task, in order."""

    results: list[BatchItemResult]


class TaskMessage(GenerateRequest):
    """What travels through the queue: the request plus what the API added."""

    kind: Kind
    model: str
    enqueued_at: float = Field(default_factory=time.time)

    def to_bytes(self) -> bytes:
        return self.model_dump_json().encode("utf-8")

    @classmethod
    def from_bytes(cls, body: bytes) -> TaskMessage:
        """Parse a queue message; raises ``pydantic.ValidationError`` on garbage."""
        return cls.model_validate_json(body)


class AudioOutput(BaseModel):
    """One generated audio object, as stored in S3."""

    # Finite and in range: a callback is stored as sent, and a number JSON allows
    # but a record cannot hold (1e309 is infinity, stored as null) made every later
    # read of the workflow fail, and the user's stats sum negative seconds.
    model_config = ConfigDict(allow_inf_nan=False)

    key: ObjectKey
    format: AudioFormat
    duration: Annotated[float, Field(ge=0.0)]
    sample_rate: Annotated[int, Field(gt=0)]
    channels: Annotated[int, Field(gt=0)]
    bytes: Annotated[int, Field(ge=0)]
    # Reproducibility record: backend, model id and revision, the seed actually
    # used, sampling params, generation seconds, batch size.
    generation: dict[str, Any] = Field(default_factory=dict)


class TaskResult(BaseModel):
    """A sub-service task's state: its Redis record and its callback body."""

    model_config = ConfigDict(allow_inf_nan=False)  # as AudioOutput

    task_id: TaskId
    kind: Kind
    status: TaskStatus
    progress: Annotated[float, Field(ge=0.0, le=1.0)] = 0.0
    output: AudioOutput | None = None
    error: str | None = None
    attempts: Annotated[int, Field(ge=0)] = 0
    updated_at: float = Field(default_factory=time.time)

    @field_validator("error")
    @classmethod
    def _storable_error(cls, value: str | None) -> str | None:
        # An exception's text may carry a NUL, which PostgreSQL text refuses: the
        # result would then never be stored, and its workflow never finish.
        return None if value is None else value.replace("\x00", "\ufffd")

    def to_bytes(self) -> bytes:
        return self.model_dump_json().encode("utf-8")

    @classmethod
    def from_bytes(cls, body: bytes) -> TaskResult:
        return cls.model_validate_json(body)
