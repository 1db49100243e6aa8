"""Fan-out: hand each kind of a new workflow to its sub-service API.

Pending fan-outs live in the database (``dispatched_at IS NULL``), so a
restarted App API resumes them. A sub-service that stays unreachable past the
deadline fails that kind with an error the client sees; a workflow never waits
forever for a task nobody accepted.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from dataclasses import dataclass
from typing import Any

from pydantic import ValidationError

from app_api import repository
from app_api.metrics import AppMetrics
from app_api.options import AppOptions
from app_api.records import WorkflowRecord
from app_api.subservices import Outcome, SubmitResult, SubServices, title
from app_api.workflow import Clock, Workflows
from core_base.constants import HTTP_TIMEOUT_S
from core_base.contracts import MAX_BATCH_TASKS, GenerateRequest
from core_base.domain import Kind
from core_base.errors import UnavailableError
from core_base.log_throttle import LogThrottle, held_back_note
from core_base.ports.database import Database

logger = logging.getLogger(__name__)

# Tasks per request to a sub-service (the most its batch route takes).
_BATCH = MAX_BATCH_TASKS
# A claimed job stays invisible to other dispatchers this long: longer than one
# request with its transport retries can take. A new workflow's fan-out is written
# claimed by its creator for as long, and dispatched from memory.
LEASE_S = 3 * HTTP_TIMEOUT_S
# Batch requests in flight to the sub-services at once: each carries up to _BATCH
# tasks, so a few keep the sub-services busy; more only open more connections.
_CONCURRENCY = 8
# How long the lookups before kinds fail at their deadline may take, together.
_LAST_WORD_WAIT_S = 5.0
# While a sub-service does not accept tasks, a line at most this often.
_REFUSALS_LOG_EVERY_S = 30.0
# New fan-outs taken from memory per round: enough to fill every request in flight,
# so a burst of calls is handed on at the sub-services' pace, not one request's.
_NEW_PER_ROUND = _BATCH * _CONCURRENCY
# Refused calls' workflows settled per round (one transaction, a few statements),
# and remembered at most (a few hundred bytes each).
_SETTLE_PER_ROUND = 1000
_MAX_UNANSWERED = 100_000


def backoff_s(attempt: int, base_s: float, cap_s: float) -> float:
    """``base * 2**(attempt-1)``, capped; ``attempt`` counts from 1."""
    return float(min(cap_s, base_s * 2 ** max(0, attempt - 1)))


def _span_s(delays: list[float]) -> str:
    """``"8.0s"``, or ``"0.5-8.0s"`` when the delays differ."""
    low, high = min(delays), max(delays)
    return f"{low:.1f}s" if f"{low:.1f}" == f"{high:.1f}" else f"{low:.1f}-{high:.1f}s"


@dataclass(frozen=True)
class NewJob:
    """A fan-out this process created and leased to itself: no database read needed."""

    job: repository.FanoutJob
    request: dict[str, Any]
    leased_until: float


class Fanout:
    """Hands each kind to its sub-service. New workflows come in through
    :meth:`submit_new` (in memory, at once, several per round); retries, and
    anything a crashed process left behind, come from polling the database."""

    def __init__(
        self,
        db: Database,
        workflows: Workflows,
        subservices: SubServices,
        metrics: AppMetrics,
        options: AppOptions,
        *,
        callback_url: str,
        clock: Clock = time.time,
    ) -> None:
        self._db = db
        self._workflows = workflows
        self._subservices = subservices
        self._metrics = metrics
        self._options = options
        self._callback_url = callback_url
        self._clock = clock
        self._new: deque[NewJob] = deque()
        # (task_id, kind) held in memory or in flight here: a database poll that
        # meets one (its lease ran out while this process was busy) leaves it alone.
        self._held: set[tuple[str, str]] = set()
        self._next_poll_at = 0.0
        # Workflows of refused calls whose inserts may land late, with their kinds:
        # held (never dispatched here) until settled.
        self._unanswered: dict[str, tuple[repository.Unanswered, list[Kind]]] = {}
        self._unanswered_dropped = LogThrottle(_REFUSALS_LOG_EVERY_S)
        self._limit = asyncio.Semaphore(_CONCURRENCY)
        self._refusals: dict[Kind, LogThrottle] = {}
        self._claiming = True  # False once stopping: nothing more from the database
        self._handed_back = False  # stopped: what comes now is left to its lease
        # New jobs taken into a round and not yet sent (waiting for a request slot):
        # a stop that cuts the round short hands them back too.
        self._unsent: dict[tuple[str, str], NewJob] = {}
        # hasten_fanout_retries tells a backoff from a lease by its length.
        if options.fanout_backoff_cap_s >= LEASE_S:
            raise ValueError("fanout_backoff_cap_s must be shorter than the fan-out lease")

    def submit_new(self, record: WorkflowRecord) -> None:
        """Queue a just-created workflow's kinds (wake the loop afterwards)."""
        if self._handed_back:  # a request handler outlived the stop's hand-back
            logger.warning(
                "stopped: workflow %s goes to its sub-services when its lease runs out",
                record.task_id,
            )
            return
        leased_until = self._workflows.fanout_leased_until(record)
        for kind in record.kinds:
            job = repository.FanoutJob(record.task_id, kind, 0, record.created_at)
            self._held.add((record.task_id, kind.value))
            self._new.append(NewJob(job, record.request, leased_until))

    def stop_claiming(self) -> None:
        """Stopping: take no more fan-outs from the database (those in memory, this
        process's own, still go until :meth:`hand_back`)."""
        self._claiming = False

    async def hand_back(self) -> None:
        """Stopping: new workflows' fan-outs not sent yet are made due at once for
        another App API, instead of waiting out their lease (which a failure here
        leaves them to)."""
        self.stop_claiming()
        self._handed_back = True
        jobs = [*self._unsent.values(), *self._new]
        self._unsent.clear()
        self._new.clear()
        if not jobs:
            return
        leases = [(n.job.task_id, n.job.kind, n.leased_until) for n in jobs]
        try:
            async with asyncio.timeout(self._options.stop_hand_back_s):
                released = await repository.release_fanouts(self._db, leases, self._clock())
        except Exception as exc:
            logger.warning(
                "stopping: %d fan-out(s) not handed back (%r); each goes when its lease runs out",
                len(jobs),
                exc,
            )
            return
        logger.info("stopping: %d fan-out(s) not sent yet handed back", released)

    def unanswered(self, record: WorkflowRecord, unanswered: repository.Unanswered) -> None:
        """The call creating ``record`` was refused after PostgreSQL did not answer
        its insert, which may still land: not dispatched from here until settled
        once PostgreSQL answers (see :func:`repository.settle_unanswered_pg`)."""
        if len(self._unanswered) >= _MAX_UNANSWERED:
            # A long hang of PostgreSQL under load: memory comes first.
            held_back = self._unanswered_dropped.due()
            if held_back is not None:
                logger.warning(
                    "%d refused calls' workflows wait to be settled: not remembering more;"
                    " any of those written will run%s",
                    len(self._unanswered),
                    held_back_note(held_back, "such calls"),
                )
            return
        self._unanswered[record.task_id] = (unanswered, list(record.kinds))
        self._held.update((record.task_id, kind.value) for kind in record.kinds)

    async def settle_unanswered(self) -> bool:
        """Settle (a round's worth of) the workflows of refused calls; False while
        some are left (PostgreSQL out of reach, or an insert still running)."""
        if not self._unanswered:
            return True
        pending = dict(list(self._unanswered.items())[:_SETTLE_PER_ROUND])
        try:
            withdrawn = await repository.settle_unanswered_pg(
                self._db, [unanswered for unanswered, _ in pending.values()], self._clock()
            )
        except UnavailableError:
            return False  # still out of reach: the next round tries again
        except Exception:
            logger.warning("settling refused calls' workflows failed; retrying", exc_info=True)
            return False
        if withdrawn is None:
            return False  # an insert may still land: the next round looks again
        for task_id, (_, kinds) in pending.items():
            del self._unanswered[task_id]
            self._held.difference_update((task_id, kind.value) for kind in kinds)
        if withdrawn:
            logger.warning(
                "withdrew %d workflow(s) written after their calls were refused (PostgreSQL"
                " answered too late; the callers were told to retry): %s",
                len(withdrawn),
                ", ".join(withdrawn),
            )
        self.poll_soon()  # those kept are due now
        return not self._unanswered

    def left_unsettled(self) -> list[str]:
        """Task ids of refused calls not settled (logged at shutdown)."""
        return list(self._unanswered)

    def poll_soon(self) -> None:
        """Make the next round read due fan-outs from the database."""
        self._next_poll_at = 0.0

    async def step(self) -> int:
        """One round of the loop: new jobs from memory; the database when its poll
        interval has passed."""
        attempted = await self._dispatch_new()
        if self._claiming and self._clock() >= self._next_poll_at:
            attempted += await self._dispatch_due()
        # After the dispatch: a hung PostgreSQL makes this wait, which must not hold
        # up workflows written before. Those held here are never dispatched first.
        await self.settle_unanswered()
        return attempted

    async def run_once(self) -> int:
        """Dispatch every new and every due fan-out; returns how many were attempted."""
        return await self._dispatch_new() + await self._dispatch_due()

    async def _dispatch_new(self) -> int:
        batch = [self._new.popleft() for _ in range(min(len(self._new), _NEW_PER_ROUND))]
        if not batch:
            return 0
        self._unsent.update(((n.job.task_id, n.job.kind.value), n) for n in batch)
        try:
            await self._dispatch([(n.job, n.request) for n in batch])
        finally:
            for n in batch:
                self._held.discard((n.job.task_id, n.job.kind.value))
        # Not reached when a stop cancels the round: those not sent then stay in
        # _unsent, for its hand-back.
        for n in batch:
            self._unsent.pop((n.job.task_id, n.job.kind.value), None)
        return len(batch)

    async def _dispatch_due(self) -> int:
        now = self._clock()
        self._next_poll_at = now + self._options.poll_interval_s
        jobs = await repository.due_fanouts(self._db, now, _BATCH)
        claimed: list[tuple[repository.FanoutJob, dict[str, Any]]] = []
        for job in jobs:
            if not self._claiming:  # a stop began meanwhile: what is claimed still goes
                break
            if (job.task_id, job.kind.value) in self._held:
                continue
            if not await repository.claim_fanout(self._db, job, now, now + LEASE_S):
                continue
            record = await repository.load_workflow(self._db, job.task_id)
            if record is not None:
                claimed.append((job, record.request))
        await self._dispatch(claimed)
        return len(claimed)

    async def _dispatch(self, jobs: list[tuple[repository.FanoutJob, dict[str, Any]]]) -> None:
        """Submit ``jobs``: batch requests of up to ``_BATCH`` tasks of one kind, at
        most ``_CONCURRENCY`` in flight, each marking what it got accepted."""
        by_kind: dict[Kind, list[tuple[repository.FanoutJob, dict[str, Any]]]] = {}
        for job, request in jobs:
            by_kind.setdefault(job.kind, []).append((job, request))
        await asyncio.gather(
            *(
                self._dispatch_kind(kind, kind_jobs[start : start + _BATCH])
                for kind, kind_jobs in by_kind.items()
                for start in range(0, len(kind_jobs), _BATCH)
            )
        )

    async def _dispatch_kind(
        self, kind: Kind, jobs: list[tuple[repository.FanoutJob, dict[str, Any]]]
    ) -> None:
        # Jobs not handed to the sub-service yet: an unexpected error before the
        # submit counts an attempt for each (after it, the sub-service may hold
        # them: they are left to their lease, and asked about at the deadline).
        unsubmitted = [job for job, _ in jobs]
        try:
            async with self._limit:
                for job, _ in jobs:  # no longer waiting: on its way now
                    self._unsent.pop((job.task_id, job.kind.value), None)
                sendable = await self._requests(kind, jobs)
                sent = unsubmitted = [job for job, _ in sendable]
                if not sendable:
                    return
                submitted = await self._subservices.submit_many(kind, [r for _, r in sendable])
                unsubmitted = []
                results = await self._last_words(sent, submitted)
                accepted = []
                retries: list[tuple[float, str]] = []
                for job, result in zip(sent, results, strict=True):
                    retry_in_s = await self._settle(job, result)
                    if result.outcome is Outcome.ACCEPTED:
                        accepted.append((job.task_id, kind))
                    elif retry_in_s is not None:
                        retries.append((retry_in_s, result.reason))
                await repository.mark_dispatched_many(self._db, accepted, self._clock())
                if self._log_refusals(kind, retries, accepted=bool(accepted)):
                    await self._hasten_retries(kind)
        except UnavailableError as exc:
            # Left claimed: the leases run out and the jobs are due again.
            logger.warning("fan-out of %d %s task(s) failed: %s", len(jobs), kind.value, exc)
        except Exception as exc:
            logger.exception("fan-out of %d %s task(s) failed", len(jobs), kind.value)
            await self._count_failed_attempts(unsubmitted, exc)

    async def _count_failed_attempts(
        self, jobs: list[repository.FanoutJob], exc: Exception
    ) -> None:
        """A bug on a kind's path before its tasks reach the sub-service (a kind
        with no route, say): each job counts an attempt as for an unreachable
        sub-service, so that the deadline fails it visibly. Left claimed, it was
        tried again at every lease, for ever (never failed, never alerted on)."""
        failed = SubmitResult(
            Outcome.RETRY, f"internal error ({type(exc).__name__}; see the App API's log)"
        )
        for job in jobs:
            try:
                await self._settle(job, failed)
            except Exception as settle_exc:
                logger.warning(
                    "fan-out: the failed attempt of %s (%s) not recorded (%r);"
                    " it goes again when its lease runs out",
                    job.task_id,
                    job.kind.value,
                    settle_exc,
                )

    async def _requests(
        self, kind: Kind, jobs: list[tuple[repository.FanoutJob, dict[str, Any]]]
    ) -> list[tuple[repository.FanoutJob, GenerateRequest]]:
        """The sub-service requests of ``jobs``. One whose stored request no longer
        passes (written by an older version, under other rules) fails its kind,
        saying why, instead of failing its whole batch again every lease."""
        sendable = []
        for job, request in jobs:
            try:
                generate = GenerateRequest(
                    task_id=job.task_id, callback_url=self._callback_url, **request
                )
            except ValidationError as exc:
                problem = exc.errors()[0]
                field = ".".join(str(part) for part in problem["loc"])
                await self._workflows.fail_kind(
                    job.task_id,
                    kind,
                    f"the request cannot be sent to {title(kind)}: {field}: {problem['msg']}",
                )
                continue
            sendable.append((job, generate))
        return sendable

    def _log_refusals(
        self, kind: Kind, retries: list[tuple[float, str]], *, accepted: bool
    ) -> bool:
        """A sub-service not accepting tasks: said when it starts, then every
        _REFUSALS_LOG_EVERY_S, not per batch (a new batch goes out every round, several
        a second while it is down), and once when it accepts again. True then."""
        throttle = self._refusals.setdefault(kind, LogThrottle(_REFUSALS_LOG_EVERY_S))
        if not retries:
            if accepted and throttle.ended():
                logger.info("fan-out: %s accepts tasks again", title(kind))
                return True
            return False
        held_back = throttle.due()
        if held_back is None:
            return False
        logger.warning(
            "fan-out: %d %s task(s) not accepted by %s (%s); retrying in %s%s",
            len(retries),
            title(kind),
            self._subservices.url(kind),
            retries[0][1],
            _span_s([delay_s for delay_s, _ in retries]),
            held_back_note(held_back, "such batch(es)"),
        )
        return False

    async def _hasten_retries(self, kind: Kind) -> None:
        """A sub-service accepts again: the tasks waiting out their backoff (up to
        the cap, 15 s) go now, at the next round, not after the new ones."""
        try:
            hastened = await repository.hasten_fanout_retries(
                self._db, kind, self._clock(), self._options.fanout_backoff_cap_s
            )
        except UnavailableError as exc:
            logger.warning("fan-out: waiting %s tasks left to their backoff: %s", title(kind), exc)
            return
        if hastened:
            logger.info("fan-out: %d waiting %s task(s) tried again now", hastened, title(kind))
            self.poll_soon()

    async def _last_words(
        self, jobs: list[repository.FanoutJob], results: list[SubmitResult]
    ) -> list[SubmitResult]:
        """Before kinds fail at their deadline, the sub-service is asked whether it
        holds their tasks after all (an earlier submit that went through while its
        answer was lost to a timeout): those are accepted, not failed while they
        run. Asked all at once, for ``_LAST_WORD_WAIT_S`` at most: a hung
        sub-service must not hold the batch past its lease."""
        now = self._clock()
        due = [
            index
            for index, (job, result) in enumerate(zip(jobs, results, strict=True))
            if result.outcome is Outcome.RETRY
            and now - job.started_at >= self._options.fanout_deadline_s
        ]
        if not due:
            return results

        async def held(job: repository.FanoutJob) -> bool:
            try:
                return await self._subservices.fetch_task(job.kind, job.task_id) is not None
            except UnavailableError:
                return False

        try:
            async with asyncio.timeout(_LAST_WORD_WAIT_S):
                answers = await asyncio.gather(*(held(jobs[index]) for index in due))
        except TimeoutError:
            answers = [False] * len(due)
        final = list(results)
        for index, is_held in zip(due, answers, strict=True):
            if is_held:
                final[index] = SubmitResult(Outcome.ACCEPTED)
        return final

    async def _settle(self, job: repository.FanoutJob, result: SubmitResult) -> float | None:
        """Record what the sub-service answered; the seconds until the next try
        when the task is to be tried again, else None."""
        self._metrics.fanout_attempts.labels(job.kind.value, result.outcome.value).inc()
        now = self._clock()
        name = title(job.kind)
        if result.outcome is Outcome.ACCEPTED:
            return None
        if result.outcome is Outcome.REJECTED:
            await self._workflows.fail_kind(
                job.task_id, job.kind, f"{name} refused the task: {result.reason}"
            )
        elif now - job.started_at >= self._options.fanout_deadline_s:
            await self._workflows.fail_kind(
                job.task_id,
                job.kind,
                f"{name} unavailable after {job.attempts + 1} attempts: {result.reason}",
            )
        else:
            delay_s = backoff_s(
                job.attempts + 1,
                self._options.fanout_backoff_base_s,
                self._options.fanout_backoff_cap_s,
            )
            await repository.schedule_fanout_retry(
                self._db,
                job.task_id,
                job.kind,
                now + delay_s,
                f"{name} not reached yet ({result.reason}); retrying",
                now,
            )
            return delay_s
        return None
