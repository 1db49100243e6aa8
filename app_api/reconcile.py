"""The reconciler: nothing stays non-terminal forever.

A kind whose sub-service accepted it but has not called back for a while is
looked up there (``GET /v1/tasks/{id}``): a terminal result is applied (the
callback was lost), an unknown task that never reported running is fanned out
again (the sub-service lost it), a running one is left alone (an unknown one
too: its worker still holds or will redeliver its message, unless its audio is
already stored: then the worker finished and its result was lost with the
record, and the stored audio is the result). Past the hard deadline, the
remaining kinds fail. Old idempotency keys are forgotten here too.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable

from app_api import repository
from app_api.options import AppOptions
from app_api.subservices import SubServices, title
from app_api.workflow import Clock, Workflows
from core_base.audio.encoding import probe
from core_base.constants import AUDIO_OBJECT_KEY
from core_base.contracts import AudioOutput, TaskResult
from core_base.domain import AudioFormat, Kind, TaskStatus
from core_base.errors import NotFoundError, UnavailableError
from core_base.ports.database import Database
from core_base.ports.storage import ObjectStorage

logger = logging.getLogger(__name__)

_BATCH = 100
_LOOKUPS_AT_ONCE = 8


class Reconciler:
    def __init__(
        self,
        db: Database,
        workflows: Workflows,
        subservices: SubServices,
        storage: ObjectStorage,
        options: AppOptions,
        *,
        on_redispatch: Callable[[], None] = lambda: None,
        clock: Clock = time.time,
    ) -> None:
        self._db = db
        self._workflows = workflows
        self._subservices = subservices
        self._storage = storage
        self._options = options
        self._on_redispatch = on_redispatch
        self._clock = clock

    async def run_once(self) -> None:
        await self._fail_overdue()
        await self._check_stale()
        await repository.forget_idempotency_keys(
            self._db, self._clock() - self._options.idempotency_ttl_s
        )

    async def _fail_overdue(self) -> None:
        deadline_s = self._options.workflow_hard_deadline_s
        overdue = await repository.overdue_workflows(self._db, self._clock() - deadline_s, _BATCH)
        for task_id in overdue:
            record = await repository.load_workflow(self._db, task_id)
            if record is None:
                continue
            for output in record.outputs:
                if not output.status.is_terminal:
                    await self._workflows.fail_kind(
                        task_id,
                        output.kind,
                        f"{title(output.kind)} did not finish within {deadline_s:.0f}s",
                    )

    async def _check_stale(self) -> None:
        now = self._clock()
        stale = await repository.stale_outputs(
            self._db, now - self._options.reconcile_stale_after_s, _BATCH
        )
        # A few at once: a sub-service that hangs costs a round its timeout per
        # lookup, not per row.
        limit = asyncio.Semaphore(_LOOKUPS_AT_ONCE)

        async def check(task_id: str, kind: Kind) -> None:
            async with limit:
                await self._check_one(task_id, kind)

        await asyncio.gather(*(check(task_id, kind) for task_id, kind in stale))

    async def _check_one(self, task_id: str, kind: Kind) -> None:
        """Look one stale kind up; whatever goes wrong, it is looked at again later,
        after the kinds that wait longer (it is touched), so that one sub-service
        down or one bad row never keeps the others from being checked."""
        try:
            result = await self._subservices.fetch_task(kind, task_id)
            if result is None:
                if await repository.reset_dispatch(self._db, task_id, kind, self._clock()):
                    logger.warning(
                        "reconcile %s: %s has no record of it; fanning out again",
                        task_id,
                        title(kind),
                    )
                    self._on_redispatch()
                    return
                # It ran. Its audio stored means its worker finished, recorded the
                # result (since lost with the record), acked, and gave up calling
                # back (the App API or its database down for minutes): nothing
                # else would ever report it.
                stored = await self._stored_result(task_id, kind)
                if stored is not None:
                    logger.warning(
                        "reconcile %s: %s has no record of it, but its audio is stored:"
                        " the worker's result was lost; applying the stored audio",
                        task_id,
                        title(kind),
                    )
                    await self._workflows.apply(stored)
                    return
                # Else its message is with a worker or back in the queue (acks come
                # only after the result is recorded), so its callback is still to
                # come; sending it again would run it twice at once. Should its
                # result be lost as well, the hard deadline fails it.
                logger.warning(
                    "reconcile %s: %s has no record of it (its task store lost data?)"
                    " after it reported running; waiting for its worker",
                    task_id,
                    title(kind),
                )
                progress = 0.0
            elif result.status.is_terminal:
                logger.info("reconcile %s/%s: applying a missed callback", task_id, kind.value)
                await self._workflows.apply(result.model_copy(update={"kind": kind}))
                return
            else:
                progress = result.progress
        except UnavailableError as exc:
            logger.warning("reconcile %s/%s: %s", task_id, kind.value, exc)
            progress = 0.0
        except Exception:
            logger.exception("reconcile %s/%s failed", task_id, kind.value)
            progress = 0.0
        try:
            await repository.touch_output(self._db, task_id, kind, progress, self._clock())
        except UnavailableError as exc:
            logger.warning("reconcile %s/%s: %s", task_id, kind.value, exc)

    async def _stored_result(self, task_id: str, kind: Kind) -> TaskResult | None:
        """The succeeded result that the audio stored for this kind stands for (its
        length, rate and channels read from the file), or None when none is stored
        (or it does not read as the format asked for)."""
        record = await repository.load_workflow(self._db, task_id)
        if record is None:
            return None
        fmt = AudioFormat(record.request.get("format", AudioFormat.WAV.value))
        key = AUDIO_OBJECT_KEY.format(task_id=task_id, kind=kind.value, format=fmt.value)
        try:
            data = await self._storage.get(key)
        except NotFoundError:
            return None
        try:
            info = await asyncio.to_thread(probe, data, fmt)
        except (ValueError, RuntimeError) as exc:  # soundfile's LibsndfileError: RuntimeError
            logger.warning(
                "reconcile %s/%s: stored audio unreadable (%s)", task_id, kind.value, exc
            )
            return None
        output = AudioOutput(
            key=key,
            format=fmt,
            duration=round(info.duration_s, 6),
            sample_rate=info.sample_rate,
            channels=info.channels,
            bytes=len(data),
        )
        return TaskResult(
            task_id=task_id, kind=kind, status=TaskStatus.SUCCEEDED, progress=1.0, output=output
        )
