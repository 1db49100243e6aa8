"""What the repository's modules share: the active statuses, placeholders, conditional
updates of many rows at once, and row values.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from core_base.ports.database import Database

# The statuses a workflow or a kind can still leave, as an SQL list.
ACTIVE = "('queued', 'running')"
# Stand-ins for an open interval bound: epoch seconds far beyond any real date.
FOREVER_S = 1e13
# Rows matched per statement by update_matching (a few parameters each).
_RELEASE_CHUNK = 100


async def update_matching(
    db: Database,
    update: str,
    columns: Sequence[str],
    rows: Sequence[Sequence[Any]],
    *args: Any,
) -> int:
    """``update`` (its WHERE clause last, ``args`` its parameters) on the rows whose
    ``columns`` equal one of ``rows``, a chunk per statement; returns rows changed."""
    changed = 0
    for start in range(0, len(rows), _RELEASE_CHUNK):
        chunk = rows[start : start + _RELEASE_CHUNK]
        first = len(args) + 1
        matches = " OR ".join(
            "("
            + " AND ".join(
                f"{column} = ${first + len(columns) * index + offset}"
                for offset, column in enumerate(columns)
            )
            + ")"
            for index in range(len(chunk))
        )
        changed += await db.execute(
            f"{update} AND ({matches})", *args, *(value for row in chunk for value in row)
        )
    return changed


def placeholders(count: int) -> str:
    """``$1, $2, ... $count``."""
    return ", ".join(f"${index}" for index in range(1, count + 1))


def float_or_none(value: Any) -> float | None:
    return None if value is None else float(value)
