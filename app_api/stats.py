"""Per-user statistics (SPEC §3) from the stats records in Postgres."""

from __future__ import annotations

import re
from datetime import UTC, date, datetime
from typing import Any

from app_api import repository
from app_api.schemas import Counters, StatsView
from core_base.domain import Kind
from core_base.errors import InvalidInputError
from core_base.ports.database import Database, Row

# A UTC offset after a time whose "+" arrived as a space: a query string's "+"
# means a space, and "since=2024-05-01T10:00:00+02:00" is often sent unencoded.
_SPACE_FOR_PLUS = re.compile(r"(?<=\d) (?=\d{2}(?::?\d{2})?$)")
_DAY_S = 24 * 3600


def parse_bound(field: str, value: str | None, *, end: bool) -> float | None:
    """An ISO date or datetime as epoch seconds (422 naming ``field`` otherwise).

    A bare date is a whole UTC day: ``since=2024-05-01`` starts at its midnight,
    ``until=2024-05-31`` includes that day. A datetime without an offset is UTC.
    """
    if value is None:
        return None
    text = value.strip()
    try:
        if len(text) == 10:
            day = date.fromisoformat(text)
            start = datetime(day.year, day.month, day.day, tzinfo=UTC).timestamp()
            # In seconds, not dates: the day after 9999-12-31 is no date.
            return start + _DAY_S if end else start
        if "T" in text.upper():
            text = _SPACE_FOR_PLUS.sub("+", text)
        moment = datetime.fromisoformat(text.replace("Z", "+00:00").replace("z", "+00:00"))
        if moment.tzinfo is None:
            moment = moment.replace(tzinfo=UTC)
        return moment.timestamp()
    except (ValueError, OverflowError):
        raise InvalidInputError(field, "must be an ISO 8601 date or datetime") from None


async def user_stats(db: Database, user_id: str, since: str | None, until: str | None) -> StatsView:
    since_s = parse_bound("since", since, end=False)
    until_s = parse_bound("until", until, end=True)
    if since_s is not None and until_s is not None and until_s <= since_s:
        raise InvalidInputError("until", "must be after since")
    low = since_s if since_s is not None else -repository.FOREVER_S
    high = until_s if until_s is not None else repository.FOREVER_S
    total = await repository.user_stats(db, user_id, low, high)
    rows = await repository.user_stats_by_kind(db, user_id, low, high)
    by_kind = {kind: Counters() for kind in Kind}
    for row in rows:
        by_kind[Kind(row["kind"])] = _counters(row)
    return StatsView(
        user_id=user_id,
        since=since,
        until=until,
        by_kind=by_kind,
        **_counters(total).model_dump(),
    )


def _counters(row: Row) -> Counters:
    def number(name: str) -> Any:
        return row.get(name) or 0

    average = row.get("avg_latency_s")
    return Counters(
        total=int(number("total")),
        succeeded=int(number("succeeded")),
        failed=int(number("failed")),
        canceled=int(number("canceled")),
        audio_seconds=round(float(number("audio_seconds")), 3),
        avg_latency_s=None if average is None else round(float(average), 3),
    )
