"""Wire formats: the task message and the result round-trip; garbage is refused."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from core_base.contracts import (
    AudioOutput,
    GenerateRequest,
    SamplingParams,
    TaskMessage,
    TaskResult,
)
from core_base.domain import AudioFormat, Kind, TaskStatus
from core_base.generation.policy import dependency_retry_s, derive_seed, retry_backoff_s


def test_task_message_round_trips() -> None:
    message = TaskMessage(
        task_id="abc",
        prompt="  a cat meowing  ",
        duration=2.5,
        format=AudioFormat.MP3,
        seed=3,
        params=SamplingParams(top_k=50, temperature=0.9),
        callback_url="http://app/cb",
        kind=Kind.SOUND,
        model="facebook/audiogen-medium",
    )
    again = TaskMessage.from_bytes(message.to_bytes())
    assert again == message
    assert again.prompt == "a cat meowing"


def test_task_result_round_trips() -> None:
    result = TaskResult(
        task_id="abc",
        kind=Kind.MUSIC,
        status=TaskStatus.SUCCEEDED,
        progress=1.0,
        output=AudioOutput(
            key="audio/abc/music.wav",
            format=AudioFormat.WAV,
            duration=5.0,
            sample_rate=32000,
            channels=1,
            bytes=320044,
            generation={"seed": 1, "backend": "synth"},
        ),
    )
    assert TaskResult.from_bytes(result.to_bytes()) == result


@pytest.mark.parametrize(
    "body",
    [
        b"",
        b"{not json",
        b'{"task_id": "x"}',
        b'{"task_id": "x", "prompt": "p", "kind": "video", "model": "m"}',
        b'{"task_id": "x", "prompt": "   ", "kind": "sound", "model": "m"}',
        b'{"task_id": "x", "prompt": "p", "kind": "sound", "model": "m", "duration": -1}',
    ],
)
def test_garbage_messages_are_refused(body: bytes) -> None:
    with pytest.raises(ValidationError):
        TaskMessage.from_bytes(body)


@pytest.mark.parametrize(
    ("field", "value"),
    [("top_k", -1), ("top_p", 1.5), ("temperature", 0), ("cfg_coef", 100), ("unknown", 1)],
)
def test_sampling_params_are_range_checked(field: str, value: float) -> None:
    with pytest.raises(ValidationError) as caught:
        GenerateRequest(task_id="x", prompt="p", params={field: value})  # type: ignore[arg-type]
    assert field in str(caught.value)


def test_terminal_statuses() -> None:
    assert {s for s in TaskStatus if s.is_terminal} == {"succeeded", "failed", "canceled"}


def test_derived_seed_is_stable_per_task_and_differs_between_tasks() -> None:
    assert derive_seed("task-1") == derive_seed("task-1")
    assert derive_seed("task-1") != derive_seed("task-2")
    assert 0 <= derive_seed("task-1") < 2**32


def test_retry_backoff_grows_and_is_capped() -> None:
    delays = [retry_backoff_s(n) for n in range(1, 12)]
    assert delays == sorted(delays)
    assert delays[1] == 2 * delays[0]
    assert max(delays) <= 30.0


def test_a_dependency_is_tried_again_within_seconds_however_long_it_was_down() -> None:
    delays = [dependency_retry_s(n) for n in range(1, 40)]
    assert delays == sorted(delays) and delays[1] == 2 * delays[0]
    assert max(delays) == 5.0
