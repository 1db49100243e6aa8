"""The App API's tables (component ``app_api``), run by ``audiocraft-service migrate``.

Written in the SQL subset PostgreSQL and SQLite share: epoch seconds as DOUBLE
PRECISION, JSON as TEXT. Never edit a released migration; add the next version.
"""

from __future__ import annotations

from core_base.db.migrations import Migration

_V1 = [
    # One row per marketplace call. `request` is the normalised call (JSON) that the
    # fan-out sends on; `kinds` is a JSON list in the caller's order.
    """
    CREATE TABLE IF NOT EXISTS app_workflows (
        task_id TEXT PRIMARY KEY,
        user_id TEXT NOT NULL,
        status TEXT NOT NULL,
        kinds TEXT NOT NULL,
        request TEXT NOT NULL,
        callback_url TEXT,
        error TEXT,
        created_at DOUBLE PRECISION NOT NULL,
        updated_at DOUBLE PRECISION NOT NULL,
        completed_at DOUBLE PRECISION
    )
    """,
    "CREATE INDEX IF NOT EXISTS app_workflows_status ON app_workflows (status)",
    "CREATE INDEX IF NOT EXISTS app_workflows_user ON app_workflows (user_id, created_at)",
    # One row per (workflow, kind): what the sub-service reported. `dispatched_at` is
    # set once the sub-service accepted the task; until then the fan-out owns the row.
    """
    CREATE TABLE IF NOT EXISTS app_workflow_outputs (
        task_id TEXT NOT NULL REFERENCES app_workflows (task_id),
        kind TEXT NOT NULL,
        status TEXT NOT NULL,
        progress DOUBLE PRECISION NOT NULL DEFAULT 0,
        output TEXT,
        error TEXT,
        audio_seconds DOUBLE PRECISION NOT NULL DEFAULT 0,
        dispatched_at DOUBLE PRECISION,
        fanout_started_at DOUBLE PRECISION NOT NULL,
        fanout_attempts INTEGER NOT NULL DEFAULT 0,
        next_fanout_at DOUBLE PRECISION,
        updated_at DOUBLE PRECISION NOT NULL,
        completed_at DOUBLE PRECISION,
        PRIMARY KEY (task_id, kind)
    )
    """,
    "CREATE INDEX IF NOT EXISTS app_outputs_fanout ON app_workflow_outputs (next_fanout_at)",
    "CREATE INDEX IF NOT EXISTS app_outputs_status ON app_workflow_outputs (status, updated_at)",
    # Exactly one statistics record per finished workflow (SPEC §6).
    """
    CREATE TABLE IF NOT EXISTS app_stats (
        task_id TEXT PRIMARY KEY,
        user_id TEXT NOT NULL,
        status TEXT NOT NULL,
        audio_seconds DOUBLE PRECISION NOT NULL,
        latency_s DOUBLE PRECISION NOT NULL,
        created_at DOUBLE PRECISION NOT NULL,
        completed_at DOUBLE PRECISION NOT NULL
    )
    """,
    "CREATE INDEX IF NOT EXISTS app_stats_user ON app_stats (user_id, created_at)",
    # At most one client webhook per workflow; `id` is the stable webhook-id.
    """
    CREATE TABLE IF NOT EXISTS app_webhook_deliveries (
        id TEXT PRIMARY KEY,
        task_id TEXT NOT NULL UNIQUE,
        url TEXT NOT NULL,
        payload TEXT NOT NULL,
        status TEXT NOT NULL,
        attempts INTEGER NOT NULL DEFAULT 0,
        next_attempt_at DOUBLE PRECISION NOT NULL,
        last_error TEXT,
        last_status_code INTEGER,
        created_at DOUBLE PRECISION NOT NULL,
        updated_at DOUBLE PRECISION NOT NULL,
        delivered_at DOUBLE PRECISION
    )
    """,
    """
    CREATE INDEX IF NOT EXISTS app_webhooks_due
        ON app_webhook_deliveries (status, next_attempt_at)
    """,
    # Idempotency-Key -> the workflow it created, scoped by the caller (user_id).
    """
    CREATE TABLE IF NOT EXISTS app_idempotency_keys (
        caller TEXT NOT NULL,
        idempotency_key TEXT NOT NULL,
        body_hash TEXT NOT NULL,
        task_id TEXT NOT NULL,
        created_at DOUBLE PRECISION NOT NULL,
        PRIMARY KEY (caller, idempotency_key)
    )
    """,
]

MIGRATIONS: list[Migration] = [
    Migration(
        component="app_api",
        version=1,
        name="workflows, outputs, stats, webhooks, idempotency keys",
        statements=tuple(_V1),
    ),
    Migration(
        component="app_api",
        version=2,
        name="index idempotency keys by age",
        # The reconciler forgets keys by age every round: without it, a full scan.
        statements=(
            "CREATE INDEX IF NOT EXISTS app_idempotency_keys_created"
            " ON app_idempotency_keys (created_at)",
        ),
    ),
    Migration(
        component="app_api",
        version=3,
        name="retention: workflows by completion, per-kind stats of deleted workflows",
        statements=(
            # Retention finds the oldest finished workflows every round, and deletes
            # their idempotency keys.
            "CREATE INDEX IF NOT EXISTS app_workflows_completed ON app_workflows (completed_at)",
            "CREATE INDEX IF NOT EXISTS app_idempotency_keys_task ON app_idempotency_keys (task_id)",
            # A deleted workflow's per-kind counters (its output rows are gone), so
            # that /v1/stats keeps counting each kind.
            """
            CREATE TABLE IF NOT EXISTS app_stats_kinds (
                task_id TEXT NOT NULL,
                kind TEXT NOT NULL,
                status TEXT NOT NULL,
                audio_seconds DOUBLE PRECISION NOT NULL,
                latency_s DOUBLE PRECISION,
                PRIMARY KEY (task_id, kind)
            )
            """,
        ),
    ),
]
