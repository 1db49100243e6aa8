"""The overload check's count of unfinished workflows, kept in memory.

Counting the active workflows in Postgres on every call costs a query that grows
with the backlog. ``MAX_QUEUE_DEPTH`` is a soft limit, so the count is read from
the database in the background every ``backlog_refresh_s`` (true across replicas
and restarts) and moved by this process's own creations and finishes in between.
A workflow whose insert is under way counts too, so that calls arriving together
cannot all pass the check before any of them is written.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from app_api import repository
from core_base.ports.database import Database


class Backlog:
    def __init__(self, db: Database) -> None:
        self._db = db
        self._active = 0
        # Bumped by every local change, so a refresh that raced one is not trusted
        # to have seen it: the local change is applied on top of the count read.
        self._local_delta = 0
        self._being_created = 0

    @property
    def active(self) -> int:
        """Workflows not yet finished (as of the last refresh, plus local changes),
        and those being created here."""
        return max(0, self._active) + self._being_created

    @contextmanager
    def creating(self) -> Iterator[None]:
        """Count one workflow as active while its insert is under way (the block);
        :meth:`created` counts it from then on if it was new."""
        self._being_created += 1
        try:
            yield
        finally:
            self._being_created -= 1

    def created(self) -> None:
        self._active += 1
        self._local_delta += 1

    def finished(self) -> None:
        self._active -= 1
        self._local_delta -= 1

    async def refresh(self) -> None:
        """Read the count from the database."""
        delta_before = self._local_delta
        counted = await repository.count_active_workflows(self._db)
        # Changes made while the query ran may or may not be in `counted`; counting
        # them again errs towards refusing, which a soft limit can afford.
        self._active = counted + max(0, self._local_delta - delta_before)
