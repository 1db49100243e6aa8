"""The reconciler: nothing stays non-terminal forever.

A kind whose sub-service accepted it but has not called back for a while is
looked up there (``GET /v1/tasks/{id}``): a terminal result is applied (the
callback was lost), an unknown task that never reported running is fanned out
again (the sub-service lost it), a running one is left alone (an unknown one
too: its worker still holds or will redeliver its message). An unknown one
whose audio is already stored was finished by its worker, whose result went with
the task store's data and whose callbacks gave up: after a grace longer than
those callbacks retry, the stored audio is the result. Past the hard deadline,
the remaining kinds fail. Old idempotency keys are forgotten here too.
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
from core_base.errors import UnavailableError
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
        # When this process first found the audio of a kind its sub-service has no
        # record of (see _unrecorded). Kept in memory: after a restart the grace
        # starts again, which only delays a rare recovery.
        self._stored_since: dict[tuple[str, Kind], float] = {}
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
        # Kinds whose audio was seen but which ended otherwise (their callback came).
        horizon = now - self._options.workflow_hard_deadline_s
        self._stored_since = {k: t for k, t in self._stored_since.items() if t > horizon}
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
                if await self._unrecorded(task_id, kind):
                    return
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

    async def _unrecorded(self, task_id: str, kind: Kind) -> bool:
        """A kind its sub-service has no record of; True when that settled it (its
        stored audio applied, or the kind fanned out again), False to wait."""
        now = self._clock()
        audio = await self._audio_key(task_id, kind)
        if audio is not None and await self._is_stored(task_id, kind, audio[0]):
            # Its worker finished (the upload comes after the generation): not to be
            # run again. Its own callback may still be retrying, with what the
            # stored audio cannot say (seed, model, timings): it gets the grace,
            # and the audio is read only once that is over.
            seen_at = self._stored_since.setdefault((task_id, kind), now)
            if now - seen_at < self._options.stored_result_grace_s:
                logger.warning(
                    "reconcile %s: %s has no record of it, but its audio is stored;"
                    " waiting for its worker's callback, else taking the audio at %.0f s",
                    task_id,
                    title(kind),
                    self._options.stored_result_grace_s,
                )
                return False
            stored = await self._stored_result(task_id, kind, *audio)
            if stored is not None:
                logger.warning(
                    "reconcile %s: %s has no record of it and no callback came: its"
                    " result was lost; applying its stored audio",
                    task_id,
                    title(kind),
                )
                await self._workflows.apply(stored)
                del self._stored_since[(task_id, kind)]
                return True
        if await repository.reset_dispatch(self._db, task_id, kind, now):
            logger.warning(
                "reconcile %s: %s has no record of it; fanning out again", task_id, title(kind)
            )
            self._on_redispatch()
            return True
        # It ran: its message is with a worker or back in the queue (acks come only
        # after the result is recorded), so its callback is still to come; sending
        # it again would run it twice at once. Should its result be lost as well
        # and its audio never be stored, the hard deadline fails it.
        logger.warning(
            "reconcile %s: %s has no record of it (its task store lost data?)"
            " after it reported running; waiting for its worker",
            task_id,
            title(kind),
        )
        return False

    async def _audio_key(self, task_id: str, kind: Kind) -> tuple[str, AudioFormat] | None:
        """Where the kind's worker stores its audio, in the call's format."""
        record = await repository.load_workflow(self._db, task_id)
        if record is None:
            return None
        fmt = AudioFormat(record.request.get("format", AudioFormat.WAV.value))
        return AUDIO_OBJECT_KEY.format(task_id=task_id, kind=kind.value, format=fmt.value), fmt

    async def _is_stored(self, task_id: str, kind: Kind, key: str) -> bool:
        """Whether ``key`` holds an object; no when the store cannot tell now."""
        try:
            return await self._storage.exists(key)
        except Exception as exc:  # down, or a 403 for a key the service may not list
            logger.warning(
                "reconcile %s/%s: cannot look %s up (%s: %s)",
                task_id,
                kind.value,
                key,
                type(exc).__name__,
                str(exc)[:200],
            )
            return False

    async def _stored_result(
        self, task_id: str, kind: Kind, key: str, fmt: AudioFormat
    ) -> TaskResult | None:
        """The succeeded result that the audio at ``key`` stands for (its length,
        rate and channels read from the file's header), or None when it cannot be
        read or does not read as ``fmt``."""
        try:
            data = await self._storage.get(key)
        except Exception as exc:  # gone meanwhile, or the store down
            logger.warning("reconcile %s/%s: cannot read %s (%s)", task_id, kind.value, key, exc)
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
