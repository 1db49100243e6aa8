"""The marketplace's wire shapes (SPEC §3): the call body and the answers.

Static rules live here, with the hard limits; :func:`call_request_model` gives
the call body with the limits a deployment configures (``MAX_PROMPT_LEN``,
``MAX_DURATION``). The callback URL's address checks are applied by the route,
against settings, with the same 422 shape.
"""

from __future__ import annotations

from functools import cache
from typing import Annotated, Any

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, create_model, field_validator

from core_base.contracts import (
    CONTROL_CHARACTERS,
    HARD_MAX_DURATION_S,
    SamplingParams,
    clean_prompt,
    is_blank,
)
from core_base.domain import AudioFormat, Kind, TaskStatus

USER_ID_MAX_LEN = 128


def printable_user_id(value: str) -> str:
    """A user id without control characters (``ValueError`` otherwise): no call
    can create another, and PostgreSQL text refuses a NUL. Nor a blank one (only
    spaces or invisible characters): no marketplace user is called that."""
    if not CONTROL_CHARACTERS.isdisjoint(value):
        raise ValueError("must not contain control characters")
    if is_blank(value):
        raise ValueError("must not be blank")
    return value


class CallRequest(BaseModel):
    """Body of ``POST /v1/call``."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    user_id: Annotated[
        str, Field(min_length=1, max_length=USER_ID_MAX_LEN), AfterValidator(printable_user_id)
    ]
    # Lengths count after trimming (the route applies MAX_PROMPT_LEN); the body
    # limit bounds the untrimmed text.
    prompt: Annotated[
        str,
        Field(
            min_length=1,
            description="1..MAX_PROMPT_LEN characters after trimming; no control characters"
            " but tabs and line breaks",
        ),
        AfterValidator(clean_prompt),
    ]
    kinds: Annotated[list[Kind], Field(min_length=1, max_length=len(Kind))] = Field(
        default_factory=lambda: [Kind.SOUND]
    )
    # Strict: a number is a JSON number ("5" and true are refused, not read as 5 and 1).
    duration: Annotated[
        float,
        Field(
            gt=0.0, le=HARD_MAX_DURATION_S, strict=True, description="seconds, at most MAX_DURATION"
        ),
    ] = 5.0
    format: AudioFormat = AudioFormat.WAV
    seed: Annotated[int, Field(ge=0, le=2**32 - 1, strict=True)] | None = None
    params: SamplingParams = Field(default_factory=SamplingParams)
    callback_url: Annotated[str, Field(min_length=1, max_length=2048)] | None = None
    # Accepted so that a melody is refused by name (the route answers 422): the
    # pipeline does not carry melodies to the workers yet.
    melody_url: Annotated[
        str | None,
        Field(max_length=2048, description="not available on this deployment (422)"),
    ] = None

    @field_validator("kinds")
    @classmethod
    def _unique_kinds(cls, value: list[Kind]) -> list[Kind]:
        if len(set(value)) != len(value):
            raise ValueError("must not contain duplicates")
        return value


@cache
def call_request_model(max_duration: float, max_prompt_len: int) -> type[CallRequest]:
    """``CallRequest`` with a deployment's ``MAX_DURATION`` and ``MAX_PROMPT_LEN``,
    so that its 422s and its OpenAPI schema state the limits that apply (the
    static model's are the hard limits no deployment can raise)."""

    def clean(value: str) -> str:
        return clean_prompt(value, max_prompt_len)

    prompt = Annotated[
        str,
        Field(
            min_length=1,
            # What a client may send; longer with surrounding blanks, which are trimmed.
            json_schema_extra={"maxLength": max_prompt_len},
            description=f"1..{max_prompt_len} characters after trimming; no control"
            " characters but tabs and line breaks",
        ),
        AfterValidator(clean),
    ]
    duration = Annotated[float, Field(gt=0.0, le=max_duration, strict=True, description="seconds")]
    model: type[CallRequest] = create_model(
        "CallRequest",
        __base__=CallRequest,
        __module__=__name__,
        prompt=(prompt, ...),
        duration=(duration, 5.0),
    )
    return model


class CallAccepted(BaseModel):
    task_id: str
    status: TaskStatus = TaskStatus.QUEUED


class OutputView(BaseModel):
    kind: Kind
    status: TaskStatus
    progress: float
    url: str | None = Field(
        default=None,
        description="signed link to the audio, valid PRESIGN_EXPIRES seconds (default 3600):"
        " GET /v1/result again for a fresh one",
    )
    format: AudioFormat | None = None
    duration: float | None = None
    sample_rate: int | None = None
    channels: int | None = None
    bytes: int | None = None
    # How the audio was made (backend, model and revision, seed, params, seconds).
    generation: dict[str, Any] | None = None
    error: str | None = None


class ResultView(BaseModel):
    """``GET /v1/result/{task_id}`` and the client webhook's body."""

    task_id: str
    user_id: str
    status: TaskStatus
    progress: float
    kinds: list[Kind]
    outputs: list[OutputView]
    error: str | None = None
    created_at: str
    completed_at: str | None = None


class Counters(BaseModel):
    total: int = Field(
        default=0,
        description="finished tasks (by_kind: finished outputs of that kind); tasks still"
        " queued or running are not counted yet",
    )
    succeeded: int = 0
    failed: int = 0
    canceled: int = 0
    audio_seconds: float = Field(default=0.0, description="seconds of audio delivered")
    avg_latency_s: float | None = Field(
        default=None,
        description="mean seconds from the call to the result, of the tasks that succeeded"
        " or failed (a cancel's timing is the client's); null when there are none",
    )


class StatsView(Counters):
    """``GET /v1/stats/{user_id}``."""

    user_id: str
    since: str | None = None
    until: str | None = None
    by_kind: dict[Kind, Counters] = Field(default_factory=dict)
