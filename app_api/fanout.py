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

from app_api import repository
from app_api.metrics import AppMetrics
from app_api.options import AppOptions
from app_api.subservices import Outcome, SubServices, title
from app_api.workflow import Clock, Workflows
from core_base.constants import HTTP_TIMEOUT_S
from core_base.contracts import GenerateRequest
from core_base.ports.database import Database

logger = logging.getLogger(__name__)

_BATCH = 100
# A claimed job stays invisible to other dispatchers this long: longer than one
# request with its transport retries can take.
_LEASE_S = 3 * HTTP_TIMEOUT_S


def backoff_s(attempt: int, base_s: float, cap_s: float) -> float:
    """``base * 2**(attempt-1)``, capped; ``attempt`` counts from 1."""
    return float(min(cap_s, base_s * 2 ** max(0, attempt - 1)))


class Fanout:
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

    async def run_once(self) -> int:
        """Dispatch every due fan-out; returns how many were attempted."""
        now = self._clock()
        jobs = await repository.due_fanouts(self._db, now, _BATCH)
        claimed = [
            job for job in jobs if await repository.claim_fanout(self._db, job, now, now + _LEASE_S)
        ]
        await asyncio.gather(*(self._dispatch(job) for job in claimed))
        return len(claimed)

    async def _dispatch(self, job: repository.FanoutJob) -> None:
        try:
            await self._dispatch_one(job)
        except Exception:
            # Left claimed: the lease runs out and the job is due again.
            logger.exception("fan-out of %s/%s failed", job.task_id, job.kind.value)

    async def _dispatch_one(self, job: repository.FanoutJob) -> None:
        record = await repository.load_workflow(self._db, job.task_id)
        if record is None:
            return
        request = GenerateRequest(
            task_id=job.task_id, callback_url=self._callback_url, **record.request
        )
        result = await self._subservices.submit(job.kind, request)
        self._metrics.fanout_attempts.labels(job.kind.value, result.outcome.value).inc()
        now = self._clock()
        name = title(job.kind)
        if result.outcome is Outcome.ACCEPTED:
            await repository.mark_dispatched(self._db, job.task_id, job.kind, now)
        elif result.outcome is Outcome.REJECTED:
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
            logger.warning(
                "fan-out of %s to %s: %s; retrying in %.1fs",
                job.task_id,
                name,
                result.reason,
                delay_s,
            )
            await repository.schedule_fanout_retry(
                self._db,
                job.task_id,
                job.kind,
                now + delay_s,
                f"{name} not reached yet ({result.reason}); retrying",
                now,
            )
