"""The App API's own state, as plain typed records (what Postgres and the Redis
cache hold; the marketplace-facing shapes are in ``schemas``)."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, Field

from core_base.contracts import AudioOutput
from core_base.domain import Kind, TaskStatus


class OutputRecord(BaseModel):
    """One requested kind of a workflow, as its sub-service reported it."""

    kind: Kind
    status: TaskStatus = TaskStatus.QUEUED
    progress: float = 0.0
    output: AudioOutput | None = None
    error: str | None = None
    dispatched_at: float | None = None
    completed_at: float | None = None
    updated_at: float = 0.0


class WorkflowRecord(BaseModel):
    """A marketplace call and what became of it."""

    task_id: str
    user_id: str
    status: TaskStatus = TaskStatus.QUEUED
    kinds: list[Kind]
    # The normalised call the fan-out sends on (prompt, duration, format, seed, params).
    request: dict[str, Any] = Field(default_factory=dict)
    callback_url: str | None = None
    error: str | None = None
    created_at: float
    updated_at: float
    completed_at: float | None = None
    outputs: list[OutputRecord] = Field(default_factory=list)

    def output(self, kind: Kind) -> OutputRecord | None:
        return next((o for o in self.outputs if o.kind == kind), None)

    @property
    def progress(self) -> float:
        """Mean progress of the kinds; a finished kind counts as 1."""
        if not self.outputs:
            return 0.0
        parts = [1.0 if o.status.is_terminal else o.progress for o in self.outputs]
        return round(sum(parts) / len(parts), 4)


def overall_status(outputs: list[OutputRecord]) -> TaskStatus | None:
    """The workflow's terminal status once every kind is terminal, else None.

    Failed when any kind failed (the others' outputs are still returned),
    canceled when any was canceled, succeeded when all succeeded.
    """
    statuses = {o.status for o in outputs}
    if not outputs or not all(s.is_terminal for s in statuses):
        return None
    if TaskStatus.FAILED in statuses:
        return TaskStatus.FAILED
    if TaskStatus.CANCELED in statuses:
        return TaskStatus.CANCELED
    return TaskStatus.SUCCEEDED


def combined_error(outputs: list[OutputRecord]) -> str | None:
    """``"sound: <reason>; music: <reason>"`` over the kinds that did not succeed."""
    errors = [f"{o.kind.value}: {o.error}" for o in outputs if o.error]
    return "; ".join(errors) or None
