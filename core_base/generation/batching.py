"""Which tasks may share one ``generate`` call (SPEC §5).

Tasks are compatible when they have the same model, the same duration bucket
and the same sampling params; prompt, seed and output format do not matter
(each item of a batch has its own). A language-model backend decodes the whole
batch for the bucket's longest duration and trims each item to its own length,
so the bucket size bounds the wasted decoding:

* up to 10 s: whole seconds (``3.2 s`` → 4), at most 1 s of waste;
* above 10 s: steps of 5 s (``12 s`` → 15), at most 5 s of waste, which is
  small next to the 10+ s every item of such a batch needs anyway.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Hashable, Sequence
from dataclasses import dataclass
from typing import TypeVar

from core_base.contracts import SamplingParams, TaskMessage

T = TypeVar("T")

# Fine buckets up to here, coarse ones above.
FINE_BUCKET_LIMIT_S = 10.0
FINE_BUCKET_S = 1.0
COARSE_BUCKET_S = 5.0
# Absorbs float noise such as 3.0000000001 from a JSON round trip, so that an
# exact bucket boundary does not spill into the next bucket.
_EPSILON_S = 1e-6


@dataclass(frozen=True)
class BatchKey:
    """Tasks with equal keys may be generated in one batch."""

    model: str
    duration_bucket_s: float
    params: SamplingParams


def duration_bucket_s(duration_s: float) -> float:
    """The longest duration of the bucket ``duration_s`` falls in."""
    if duration_s <= 0:
        raise ValueError(f"duration must be positive, got {duration_s}")
    step_s = FINE_BUCKET_S if duration_s <= FINE_BUCKET_LIMIT_S + _EPSILON_S else COARSE_BUCKET_S
    # At least the first bucket: the noise allowance must not round a tiny (but
    # positive) duration down to an empty one.
    return float(max(1, math.ceil(duration_s / step_s - _EPSILON_S)) * step_s)


def batch_key(message: TaskMessage) -> BatchKey:
    """The grouping key of a queued task."""
    return BatchKey(
        model=message.model,
        duration_bucket_s=duration_bucket_s(message.duration),
        params=message.params,
    )


def group_compatible(
    messages: Sequence[T], key: Callable[[T], Hashable], max_batch: int
) -> list[list[T]]:
    """Split ``messages`` (in arrival order) into batches of compatible ones.

    Order is kept within and across batches: batches come in the order of their
    oldest message, so the first batch always holds the oldest message and no
    task waits behind younger ones of another kind. A group larger than
    ``max_batch`` is split; its overflow starts a new batch at the arrival of
    its first message.
    """
    if max_batch < 1:
        raise ValueError(f"max_batch must be at least 1, got {max_batch}")
    batches: list[list[T]] = []
    open_batches: dict[Hashable, list[T]] = {}
    for message in messages:
        group_key = key(message)
        batch = open_batches.get(group_key)
        if batch is None or len(batch) >= max_batch:
            batch = []
            batches.append(batch)
            open_batches[group_key] = batch
        batch.append(message)
    return batches
