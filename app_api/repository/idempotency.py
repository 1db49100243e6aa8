"""``Idempotency-Key``s (``app_idempotency_keys``): remembered with the task they
created, looked up, and forgotten after their time.
"""

from __future__ import annotations

from core_base.ports.database import Database, Row


async def remember_idempotency_key(
    db: Database, caller: str, key: str, body_hash: str, task_id: str, now: float
) -> bool:
    """True when this call registered the key; False when it was already there."""
    changed = await db.execute(
        "INSERT INTO app_idempotency_keys (caller, idempotency_key, body_hash, task_id, created_at)"
        " VALUES ($1, $2, $3, $4, $5) ON CONFLICT (caller, idempotency_key) DO NOTHING",
        caller,
        key,
        body_hash,
        task_id,
        now,
    )
    return changed == 1


async def get_idempotency_key(db: Database, caller: str, key: str) -> Row | None:
    return await db.fetchrow(
        "SELECT body_hash, task_id FROM app_idempotency_keys"
        " WHERE caller = $1 AND idempotency_key = $2",
        caller,
        key,
    )


async def forget_idempotency_keys(db: Database, created_before: float) -> int:
    return await db.execute(
        "DELETE FROM app_idempotency_keys WHERE created_at < $1", created_before
    )
