"""A worker's claims on the tasks it generates (see ``TASK_CLAIM_KEY``).

A task is claimed in the check before the model (the same round trip as its
record) and held until its group of tasks is done: renewed every
``TASK_CLAIM_RENEW_S`` by one loop for all of them (sooner again after a failed
try, and a claim that ran out meanwhile is taken again). Then a task whose
result is recorded keeps its claim until it runs out (copies find the record);
the others are released at once. A copy of the task delivered to another worker
meanwhile waits for that result instead of generating the task too (see
``Worker._wait_for_holder``).

Each group of tasks is claimed under a claimant of its own (this worker and a
number), so that a release of an earlier group's claims, late in the
background, never lets go of a later group's claim on the same task. A claim of
this worker's that it no longer holds (left by a failed release) is stale: the
next claim takes it over. A release waits for a renewal under way, which could
otherwise take the claim again just after. While the model shows no progress
for ``TASK_CLAIM_STALL_S`` (hung), nothing is renewed.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import os
import secrets
import socket
import time
from collections.abc import Sequence

from core_base.constants import TASK_CLAIM_RENEW_S, TASK_CLAIM_STALL_S
from core_base.contracts import TaskResult
from core_base.generation.task_store import TaskStore
from core_base.log_throttle import LogThrottle, held_back_note

logger = logging.getLogger(__name__)

# After a renewal that failed (Redis slow or down), the next try comes this soon:
# one timed-out try must not use up a claim's TTL.
_RETRY_S = 1.0
_FAILURE_LOG_EVERY_S = 30.0


class Claims:
    def __init__(self, store: TaskStore) -> None:
        self._store = store
        # Names the pod and process for whoever reads a claim; unique per worker.
        self.identity = f"{socket.gethostname()}:{os.getpid()}:{secrets.token_hex(4)}".encode()
        self._mine = self.identity + b"#"  # every claimant of this worker starts so
        self._numbers = itertools.count(1)
        self._renewing = asyncio.Lock()  # a renewal and a release never cross
        self._held: dict[str, bytes] = {}  # task id -> its claimant, renewed
        self._taken_over: set[str] = set()  # already logged
        self._failures = LogThrottle(_FAILURE_LOG_EVERY_S)
        # When the generation in the model started (None: none runs), and its last
        # progress; written from the model thread too (a float: atomic).
        self._generating_since: float | None = None
        self._progress_at = 0.0
        self._stall_told = False

    def new_claimant(self) -> bytes:
        return self._mine + str(next(self._numbers)).encode()

    async def check_and_claim(
        self, task_ids: Sequence[str], claimant: bytes
    ) -> list[tuple[TaskResult | None, bytes | None]]:
        """:meth:`TaskStore.check_and_claim`, taking over this worker's stale
        claims; the claims taken are held (renewed) from now on."""
        checked = await self._store.check_and_claim(task_ids, claimant, take_over=self._mine)
        for task_id, (_, holder) in zip(task_ids, checked, strict=True):
            if holder is None:
                self._held[task_id] = claimant
        return checked

    def alive(self, holder: bytes | None) -> bool:
        """``holder`` (of a claim) generates the task now: another worker (which
        renews its claim: it lives), or this one, holding it."""
        if holder is None:
            return False
        return not holder.startswith(self._mine) or holder in self._held.values()

    def generation_started(self) -> None:
        self._generating_since = time.monotonic()

    def generation_progressed(self) -> None:
        """From the model thread, at each step."""
        self._progress_at = time.monotonic()

    def generation_ended(self) -> None:
        self._generating_since = None

    async def let_go(self, task_ids: Sequence[str], claimant: bytes, *, release: bool) -> None:
        """Stop renewing these claims; ``release``: delete them too (the tasks were
        not finished here: a copy waiting for them runs now, not once they run out)."""
        for task_id in task_ids:
            if self._held.get(task_id) == claimant:
                del self._held[task_id]
        self._taken_over.difference_update(task_ids)
        if not release or not task_ids:
            return
        try:
            async with self._renewing:
                await self._store.release_claims(task_ids, claimant)
        except Exception as exc:
            # They run out on their own: a copy waiting for them waits that long.
            logger.warning("could not release the claims on %d task(s): %s", len(task_ids), exc)

    def _stalled(self, held: int) -> bool:
        """The generation in the model has shown no progress for TASK_CLAIM_STALL_S."""
        since = self._generating_since
        silent_s = 0.0 if since is None else time.monotonic() - max(since, self._progress_at)
        if silent_s < TASK_CLAIM_STALL_S:
            if self._stall_told:
                self._stall_told = False
                logger.info("the model shows progress again; its claims are renewed")
            return False
        if not self._stall_told:
            self._stall_told = True
            logger.error(
                "the model has shown no progress for %.0fs (hung?): the claims on %d"
                " task(s) are left to run out, for copies delivered elsewhere to run",
                silent_s,
                held,
            )
        return True

    async def keep(self) -> None:
        """Renew the claims held, for ever (cancelled when the worker stops)."""
        pause_s = TASK_CLAIM_RENEW_S
        while True:
            await asyncio.sleep(pause_s)
            pause_s = TASK_CLAIM_RENEW_S
            try:
                if not await self._renew():
                    pause_s = _RETRY_S
            except Exception:  # a bug: said, and the loop goes on (every claim hangs on it)
                logger.exception("renewing the task claims failed")
                pause_s = _RETRY_S

    async def _renew(self) -> bool:
        """One round of renewals; False when it failed (said)."""
        async with self._renewing:
            held = dict(self._held)
            if not held or self._stalled(len(held)):
                return True
            try:
                # No take-over here: a renewal under way at the end of a group would
                # take a next group's claim on the same task back.
                others = await self._store.renew_claims(held)
            except Exception as exc:
                held_back = self._failures.due()
                if held_back is not None:
                    logger.warning(
                        "could not renew the claims on %d task(s) (retrying in %.0fs): %s%s",
                        len(held),
                        _RETRY_S,
                        exc,
                        held_back_note(held_back, "tries"),
                    )
                return False
        if self._failures.ended():
            logger.info("claims renewed again")
        # A later group of this worker's holding a task is no one else.
        others = {t: holder for t, holder in others.items() if not holder.startswith(self._mine)}
        for task_id in others.keys() - self._taken_over:
            self._taken_over.add(task_id)
            logger.warning(
                "task %s: this worker's claim on it ran out and %s took it (the task"
                " store was out of reach for a while?); both may generate it",
                task_id,
                others[task_id].decode(errors="replace"),
            )
        return True
