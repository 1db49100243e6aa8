"""Every SQL statement of the App API, once, on the ``Database`` port: one module per
table (or per job on a table), the names all here (``repository.finish_kind``).

Placeholders are ``$1, $2 ...``; the SQL is the subset PostgreSQL and SQLite
share. Functions take a ``Database`` that may be a transaction. Status
transitions are conditional updates (``WHERE status IN (...)``), so a repeated
or late message changes nothing, and the returned row count says whether this
call made the change.
"""

from app_api.repository._shared import FOREVER_S
from app_api.repository.deliveries import (
    Delivery,
    claim_delivery,
    due_deliveries,
    get_delivery,
    insert_delivery,
    postpone_deliveries,
    record_delivery_attempt,
    release_deliveries,
)
from app_api.repository.fanout import (
    FanoutJob,
    Unanswered,
    claim_fanout,
    due_fanouts,
    hasten_fanout_retries,
    mark_dispatched,
    mark_dispatched_many,
    release_fanouts,
    requeue_unfinished,
    reset_dispatch,
    schedule_fanout_retry,
    settle_unanswered_pg,
)
from app_api.repository.idempotency import (
    forget_idempotency_keys,
    get_idempotency_key,
    remember_idempotency_key,
)
from app_api.repository.outputs import (
    Finished,
    finish_kind,
    finish_output,
    mark_running,
    stale_outputs,
    touch_output,
)
from app_api.repository.retention import (
    Expired,
    delete_workflows,
    deleted_by_retention,
    expired_workflows,
    object_keys,
)
from app_api.repository.stats import (
    insert_stats,
    user_stats,
    user_stats_by_kind,
)
from app_api.repository.workflows import (
    NewWorkflow,
    active_workflows_by_kind,
    count_active_workflows,
    finish_workflow,
    insert_workflow,
    insert_workflows_pg,
    load_workflow,
    overdue_workflows,
)

__all__ = [
    "FOREVER_S",
    "Delivery",
    "Expired",
    "FanoutJob",
    "Finished",
    "NewWorkflow",
    "Unanswered",
    "active_workflows_by_kind",
    "claim_delivery",
    "claim_fanout",
    "count_active_workflows",
    "delete_workflows",
    "deleted_by_retention",
    "due_deliveries",
    "due_fanouts",
    "expired_workflows",
    "finish_kind",
    "finish_output",
    "finish_workflow",
    "forget_idempotency_keys",
    "get_delivery",
    "get_idempotency_key",
    "hasten_fanout_retries",
    "insert_delivery",
    "insert_stats",
    "insert_workflow",
    "insert_workflows_pg",
    "load_workflow",
    "mark_dispatched",
    "mark_dispatched_many",
    "mark_running",
    "object_keys",
    "overdue_workflows",
    "postpone_deliveries",
    "record_delivery_attempt",
    "release_deliveries",
    "release_fanouts",
    "remember_idempotency_key",
    "requeue_unfinished",
    "reset_dispatch",
    "schedule_fanout_retry",
    "settle_unanswered_pg",
    "stale_outputs",
    "touch_output",
    "user_stats",
    "user_stats_by_kind",
]
