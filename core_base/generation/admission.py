"""Admitting tasks into a generation service: check, deduplicate, publish, record.

One code path for ``POST /v1/generate`` (one task) and ``POST /v1/generate/batch``
(many): a batch costs one ``MGET``, a queue-depth check (a broker round trip
at most twice a second), concurrent publisher-confirmed publishes and one
pipelined write, instead of those round trips per task. Each task gets its own
outcome; one bad task never refuses its batch-mates.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Sequence
from dataclasses import dataclass

from prometheus_client import Counter

from core_base.contracts import GenerateRequest, TaskMessage, TaskResult
from core_base.domain import TaskStatus
from core_base.errors import InvalidInputError, OverloadedError, ServiceError, UnavailableError
from core_base.generation.queue_depth import QueueDepth
from core_base.generation.spec import ServiceSpec
from core_base.generation.task_store import TaskStore
from core_base.log_throttle import LogThrottle, held_back_note
from core_base.ports.broker import Broker, QueueSpec
from core_base.settings import GenerationSettings

logger = logging.getLogger(__name__)

# Seconds a client is told to wait when the queue is too deep: about the time a
# worker needs to clear a batch of short tasks.
OVERLOAD_RETRY_AFTER_S = 10
_DEPTH_FAILURE_LOG_EVERY_S = 30.0


@dataclass(frozen=True)
class Admitted:
    """A task now queued, or one recorded earlier (``duplicate``) with its status."""

    task_id: str
    status: TaskStatus
    duplicate: bool = False


Outcome = Admitted | ServiceError


def check_limits(request: GenerateRequest, settings: GenerationSettings) -> None:
    """The deployment's limits (MAX_DURATION, MAX_PROMPT_LEN), tighter than the schema's."""
    if request.duration > settings.max_duration:
        raise InvalidInputError("duration", f"must be at most {settings.max_duration:g} seconds")
    if len(request.prompt) > settings.max_prompt_len:
        raise InvalidInputError("prompt", f"must be at most {settings.max_prompt_len} characters")


class Admission:
    def __init__(
        self,
        spec: ServiceSpec,
        settings: GenerationSettings,
        *,
        broker: Broker,
        queue: QueueSpec,
        store: TaskStore,
        submitted: Counter,
    ) -> None:
        self._spec = spec
        self._settings = settings
        self._broker = broker
        self._queue = queue
        self._store = store
        self._submitted = submitted
        self._depth = QueueDepth(broker, queue)
        # Each submit meets an unreachable queue again (the fan-out retries every
        # half second): a line when it starts, then at most one per interval.
        self._depth_failures = LogThrottle(_DEPTH_FAILURE_LOG_EVERY_S)

    async def admit(self, request: GenerateRequest) -> Admitted:
        """Admit one task; raises the :class:`ServiceError` that refused it."""
        (outcome,) = await self.admit_many([request])
        if isinstance(outcome, ServiceError):
            raise outcome
        return outcome

    async def admit_many(self, requests: Sequence[GenerateRequest]) -> list[Outcome]:
        """An outcome per request, in order."""
        outcomes: list[Outcome | None] = [None] * len(requests)
        for index, request in enumerate(requests):
            try:
                check_limits(request, self._settings)
            except InvalidInputError as exc:
                outcomes[index] = exc
        # Both at once (the depth, when its reading is stale, is a round trip too).
        _, refusal = await asyncio.gather(
            self._find_duplicates(requests, outcomes), self._queue_refusal()
        )
        fresh = [i for i, outcome in enumerate(outcomes) if outcome is None]
        if fresh:
            if refusal is not None:
                for index in fresh:
                    outcomes[index] = refusal
            else:
                await self._publish_and_record([requests[i] for i in fresh], fresh, outcomes)
        decided = [outcome for outcome in outcomes if outcome is not None]
        assert len(decided) == len(requests), "every request gets an outcome"
        for outcome in decided:
            self._count(outcome)
        return decided

    async def _find_duplicates(
        self, requests: Sequence[GenerateRequest], outcomes: list[Outcome | None]
    ) -> None:
        """Tasks already recorded (a retried fan-out) are answered with their status;
        a task id repeated within the batch is published once."""
        candidates = [i for i, outcome in enumerate(outcomes) if outcome is None]
        recorded = await self._store.get_many([requests[i].task_id for i in candidates])
        first_in_batch: dict[str, int] = {}
        for index, existing in zip(candidates, recorded, strict=True):
            task_id = requests[index].task_id
            if existing is not None:
                outcomes[index] = Admitted(task_id, existing.status, duplicate=True)
            elif task_id in first_in_batch:
                outcomes[index] = Admitted(task_id, TaskStatus.QUEUED, duplicate=True)
            else:
                first_in_batch[task_id] = index

    async def _queue_refusal(self) -> ServiceError | None:
        """Why no new task can be queued now (queue unreachable or full), or None.
        Checked once per batch against a recent reading (see :class:`QueueDepth`),
        so the queue may go past the limit by what a moment brings."""
        try:
            depth = await self._depth.current()
        except UnavailableError as exc:
            # The broker is down: its error says so; a traceback per batch would not.
            held_back = self._depth_failures.due()
            if held_back is not None:
                logger.warning(
                    "%s queue depth unavailable: %s%s",
                    self._spec.title,
                    exc,
                    held_back_note(held_back, "such submits"),
                )
            return UnavailableError("the task queue is unreachable")
        except Exception:
            logger.warning("%s queue depth unavailable", self._spec.title, exc_info=True)
            return UnavailableError("the task queue is unreachable")
        if self._depth_failures.ended():
            logger.info("%s queue depth readable again", self._spec.title)
        if depth >= self._settings.max_queue_depth:
            return OverloadedError(
                f"{self._spec.title} queue is full ({depth} tasks waiting)",
                OVERLOAD_RETRY_AFTER_S,
            )
        return None

    async def _publish_and_record(
        self,
        requests: list[GenerateRequest],
        indexes: list[int],
        outcomes: list[Outcome | None],
    ) -> None:
        # Publish before recording: a task recorded but never published would look
        # queued forever. A duplicate publish is harmless (the worker skips tasks
        # that already have a result).
        published = await asyncio.gather(
            *(self._publish(request) for request in requests), return_exceptions=True
        )
        queued: list[TaskResult] = []
        for index, request, error in zip(indexes, requests, published, strict=True):
            if isinstance(error, BaseException):
                logger.warning("publishing %s failed: %s", request.task_id, error)
                outcomes[index] = UnavailableError("the task could not be queued; retry later")
            else:
                queued.append(
                    TaskResult(
                        task_id=request.task_id, kind=self._spec.kind, status=TaskStatus.QUEUED
                    )
                )
                outcomes[index] = Admitted(request.task_id, TaskStatus.QUEUED)
        await self._store.create_many_if_absent(queued)

    async def _publish(self, request: GenerateRequest) -> None:
        message = TaskMessage(
            **request.model_dump(),
            kind=self._spec.kind,
            model=self._settings.model or self._spec.default_model,
        )
        await self._broker.publish(self._queue, message.to_bytes(), message_id=request.task_id)

    def _count(self, outcome: Outcome) -> None:
        if isinstance(outcome, Admitted):
            label = "duplicate" if outcome.duplicate else "queued"
        elif isinstance(outcome, OverloadedError):
            label = "overloaded"
        elif isinstance(outcome, UnavailableError):
            label = "unavailable"
        else:
            label = "invalid"
        self._submitted.labels(self._spec.name, label).inc()
