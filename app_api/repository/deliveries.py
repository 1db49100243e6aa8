"""Client webhook deliveries (``app_webhook_deliveries``): due, leased, postponed and
attempted.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from app_api.repository._shared import update_matching
from core_base.ports.database import Database, Row


@dataclass(frozen=True)
class Delivery:
    id: str
    task_id: str
    url: str
    payload: str
    status: str
    attempts: int
    created_at: float


async def insert_delivery(
    db: Database,
    delivery_id: str,
    task_id: str,
    url: str,
    payload: str,
    now: float,
    *,
    next_attempt_at: float | None = None,
) -> bool:
    """A pending delivery, due at ``next_attempt_at`` (default: now); a later time
    leaves the first attempt to the process that wrote it (a lease, as a claim)."""
    changed = await db.execute(
        "INSERT INTO app_webhook_deliveries (id, task_id, url, payload, status, attempts,"
        " next_attempt_at, created_at, updated_at) VALUES ($1, $2, $3, $4, 'pending', 0, $6, $5, $5)"
        " ON CONFLICT (task_id) DO NOTHING",
        delivery_id,
        task_id,
        url,
        payload,
        now,
        now if next_attempt_at is None else next_attempt_at,
    )
    return changed == 1


async def due_deliveries(db: Database, now: float, limit: int) -> list[tuple[str, str]]:
    """(id, url) of the deliveries due, the longest due first."""
    rows = await db.fetch(
        "SELECT id, url FROM app_webhook_deliveries"
        " WHERE status = 'pending' AND next_attempt_at <= $1"
        " ORDER BY next_attempt_at LIMIT $2",
        now,
        limit,
    )
    return [(str(r["id"]), str(r["url"])) for r in rows]


async def postpone_deliveries(
    db: Database, delivery_ids: Sequence[str], now: float, until: float
) -> None:
    """Make due deliveries due again at ``until`` (unless another dispatcher took
    them meanwhile), in one statement."""
    if not delivery_ids:
        return
    ids = ", ".join(f"${index + 3}" for index in range(len(delivery_ids)))
    await db.execute(
        "UPDATE app_webhook_deliveries SET next_attempt_at = $2"
        f" WHERE status = 'pending' AND next_attempt_at <= $1 AND id IN ({ids})",
        now,
        until,
        *delivery_ids,
    )


async def claim_delivery(db: Database, delivery_id: str, now: float, lease_until: float) -> bool:
    """Take a due delivery until ``lease_until``; False when another dispatcher has it.
    A crashed dispatcher's lease simply runs out and the delivery is due again."""
    changed = await db.execute(
        "UPDATE app_webhook_deliveries SET next_attempt_at = $3"
        " WHERE id = $1 AND status = 'pending' AND next_attempt_at <= $2",
        delivery_id,
        now,
        lease_until,
    )
    return changed == 1


async def release_deliveries(db: Database, leases: Sequence[tuple[str, float]], now: float) -> int:
    """Hand leased deliveries, given as (id, leased until), back to any dispatcher
    (due at ``now``): those still pending under that very lease, none another
    dispatcher took since. Returns how many."""
    return await update_matching(
        db,
        "UPDATE app_webhook_deliveries SET next_attempt_at = $1 WHERE status = 'pending'",
        ("id", "next_attempt_at"),
        leases,
        now,
    )


async def get_delivery(db: Database, delivery_id: str) -> Delivery | None:
    row = await db.fetchrow("SELECT * FROM app_webhook_deliveries WHERE id = $1", delivery_id)
    return None if row is None else _delivery(row)


async def record_delivery_attempt(
    db: Database,
    delivery_id: str,
    *,
    attempt: int,
    status: str,
    next_attempt_at: float,
    error: str | None,
    status_code: int | None,
    now: float,
) -> None:
    """Record the outcome of attempt number ``attempt`` (1 for the first). Only
    over the attempt before it: repeating the write (its answer was lost) changes
    nothing, nor does a late one after another dispatcher's attempt; except a
    delivery, which ends the retries whatever was recorded meanwhile."""
    await db.execute(
        "UPDATE app_webhook_deliveries SET status = $2,"
        " attempts = CASE WHEN attempts > $7 THEN attempts ELSE $7 END,"
        " next_attempt_at = $3, last_error = $4, last_status_code = $5, updated_at = $6,"
        " delivered_at = CASE WHEN $2 = 'delivered' THEN $6 ELSE delivered_at END"
        " WHERE id = $1 AND status = 'pending' AND (attempts = $7 - 1 OR $2 = 'delivered')",
        delivery_id,
        status,
        next_attempt_at,
        error,
        status_code,
        now,
        attempt,
    )


def _delivery(row: Row) -> Delivery:
    return Delivery(
        id=str(row["id"]),
        task_id=str(row["task_id"]),
        url=str(row["url"]),
        payload=str(row["payload"]),
        status=str(row["status"]),
        attempts=int(row["attempts"]),
        created_at=float(row["created_at"]),
    )
