"""Workflows this process created, remembered as they were written, so that a
result for one of them is worked out without first reading it back.

Nothing trusts a remembered record blindly: the write that folds a result in is
conditional on every kind's outcome being what the record says (see
:func:`app_api.repository.finish_kind`), so a copy gone stale (another kind
finished meanwhile, here or in another App API) writes nothing, and the workflow
is then read from the database as usual. A record is handed out once; the memory
is bounded, oldest forgotten first.
"""

from __future__ import annotations

from collections import OrderedDict

from app_api.records import OutputRecord, WorkflowRecord

# About 2 KB each. A workflow that takes longer to finish than this many calls take
# to arrive is read from the database instead.
DEFAULT_CAPACITY = 10_000


class RememberedWorkflows:
    def __init__(self, capacity: int = DEFAULT_CAPACITY) -> None:
        self._capacity = capacity
        self._records: OrderedDict[str, WorkflowRecord] = OrderedDict()

    def add(self, record: WorkflowRecord) -> None:
        """Remember ``record`` as just inserted: queued, each kind queued."""
        self._records[record.task_id] = record.model_copy(
            update={
                "outputs": [
                    OutputRecord(kind=kind, updated_at=record.created_at) for kind in record.kinds
                ]
            }
        )
        while len(self._records) > self._capacity:
            self._records.popitem(last=False)

    def take(self, task_id: str) -> WorkflowRecord | None:
        """The remembered record, now forgotten (the caller may change it); None
        when there is none."""
        return self._records.pop(task_id, None)

    def __len__(self) -> int:
        return len(self._records)
