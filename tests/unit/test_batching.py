"""Which tasks share a batch (core_base.generation.batching)."""

from __future__ import annotations

import itertools
from collections.abc import Callable, Hashable

import pytest

from core_base.contracts import SamplingParams, TaskMessage
from core_base.domain import AudioFormat, Kind
from core_base.generation.batching import (
    BatchKey,
    batch_key,
    duration_bucket_s,
    group_compatible,
)

_ids = itertools.count()


def _message(
    *,
    model: str = "facebook/musicgen-small",
    duration: float = 5.0,
    prompt: str = "lo-fi piano",
    seed: int | None = None,
    fmt: AudioFormat = AudioFormat.WAV,
    **params: float,
) -> TaskMessage:
    return TaskMessage(
        task_id=f"task-{next(_ids)}",
        prompt=prompt,
        duration=duration,
        format=fmt,
        seed=seed,
        params=SamplingParams(**params),  # type: ignore[arg-type]
        kind=Kind.MUSIC,
        model=model,
    )


@pytest.mark.parametrize(
    ("duration_s", "bucket_s"),
    [
        (5e-324, 1.0),  # the smallest positive float: within the noise allowance, not 0
        (1e-6, 1.0),
        (0.1, 1.0),
        (1.0, 1.0),
        (1.01, 2.0),
        (3.0000000001, 3.0),  # float noise from a JSON round trip stays in its bucket
        (9.5, 10.0),
        (10.0, 10.0),
        (10.2, 15.0),
        (15.0, 15.0),
        (17.0, 20.0),
        (29.99, 30.0),
        (30.0, 30.0),
        (120.0, 120.0),
    ],
)
def test_duration_buckets(duration_s: float, bucket_s: float) -> None:
    assert duration_bucket_s(duration_s) == bucket_s


def test_a_bucket_always_covers_its_durations() -> None:
    for tenth in range(1, 600):
        duration_s = tenth / 10
        bucket = duration_bucket_s(duration_s)
        assert duration_s <= bucket
        assert bucket - duration_s < (1.0 if duration_s <= 10 else 5.0)


@pytest.mark.parametrize("duration_s", [0.0, -1.0])
def test_a_non_positive_duration_has_no_bucket(duration_s: float) -> None:
    with pytest.raises(ValueError, match="positive"):
        duration_bucket_s(duration_s)


def test_prompt_seed_and_format_do_not_split_a_batch() -> None:
    first = _message(prompt="rain", seed=1, fmt=AudioFormat.WAV, duration=4.2)
    second = _message(prompt="a dog", seed=None, fmt=AudioFormat.MP3, duration=4.9)

    assert batch_key(first) == batch_key(second)
    assert hash(batch_key(first)) == hash(batch_key(second))


@pytest.mark.parametrize(
    "other",
    [
        {"model": "facebook/musicgen-medium"},
        {"duration": 6.5},
        {"temperature": 0.7},
        {"top_k": 50},
        {"cfg_coef": 5.0},
    ],
)
def test_model_bucket_and_params_split_batches(other: dict[str, object]) -> None:
    assert batch_key(_message()) != batch_key(_message(**other))  # type: ignore[arg-type]


def test_the_key_names_what_it_groups_by() -> None:
    key = batch_key(_message(duration=12.0, temperature=0.9))

    assert key == BatchKey(
        model="facebook/musicgen-small",
        duration_bucket_s=15.0,
        params=SamplingParams(temperature=0.9),
    )


def _letters(text: str) -> list[str]:
    """Messages as strings: the letter is the group, the digit the arrival."""
    return text.split()


def _group(text: str, max_batch: int) -> list[str]:
    key: Callable[[str], Hashable] = lambda message: message[0]  # noqa: E731
    return [" ".join(batch) for batch in group_compatible(_letters(text), key, max_batch)]


def test_compatible_messages_are_grouped_in_arrival_order() -> None:
    assert _group("a1 b1 a2 c1 b2 a3", max_batch=8) == ["a1 a2 a3", "b1 b2", "c1"]


def test_the_first_batch_holds_the_oldest_message() -> None:
    assert _group("b1 a1 a2 a3 b2", max_batch=8)[0] == "b1 b2"


def test_groups_larger_than_max_batch_are_split() -> None:
    assert _group("a1 a2 a3 a4 a5", max_batch=2) == ["a1 a2", "a3 a4", "a5"]


def test_an_overflow_batch_takes_its_place_by_arrival() -> None:
    assert _group("a1 a2 b1 a3 c1", max_batch=2) == ["a1 a2", "b1", "a3", "c1"]


def test_max_batch_one_keeps_the_queue_order() -> None:
    assert _group("a1 b1 a2", max_batch=1) == ["a1", "b1", "a2"]


def test_nothing_in_nothing_out() -> None:
    assert group_compatible([], batch_key, max_batch=4) == []


def test_max_batch_must_be_positive() -> None:
    with pytest.raises(ValueError, match="max_batch"):
        group_compatible([_message()], batch_key, max_batch=0)


def test_grouping_task_messages_keeps_every_message_once() -> None:
    messages = [
        _message(duration=4.5, seed=1),
        _message(duration=12.0),
        _message(duration=4.2, seed=2, fmt=AudioFormat.FLAC),
        _message(duration=4.0, temperature=0.5),
        _message(duration=14.0),
        _message(duration=4.9, seed=3),
    ]

    batches = group_compatible(messages, batch_key, max_batch=2)

    ids = [[m.task_id for m in batch] for batch in batches]
    task = [m.task_id for m in messages]
    assert ids == [[task[0], task[2]], [task[1], task[4]], [task[3]], [task[5]]]
    for batch in batches:
        assert len({batch_key(m) for m in batch}) == 1
