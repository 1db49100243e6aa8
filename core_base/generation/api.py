"""The generation service's internal HTTP API (SPEC §2 step 5).

``POST /v1/generate`` validates a task, publishes it as a persistent message
(publisher-confirmed) and records it as ``queued``; ``GET /v1/tasks/{id}``
returns its record. Only the App API calls it, with ``INTERNAL_TOKEN``.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Annotated

from fastapi import Depends, FastAPI, Path
from fastapi.responses import JSONResponse
from prometheus_client import CollectorRegistry, Counter

from core_base.constants import MAX_BODY_BYTES
from core_base.contracts import GenerateRequest, TaskMessage, TaskResult
from core_base.domain import TaskStatus
from core_base.errors import InvalidInputError, NotFoundError, OverloadedError, UnavailableError
from core_base.generation.spec import ServiceSpec
from core_base.generation.task_store import TaskStore
from core_base.http.auth import require_bearer
from core_base.http.errors import BodySizeLimitMiddleware, install_error_handlers
from core_base.http.health import health_router
from core_base.http.metrics import HttpMetricsMiddleware, metrics_router
from core_base.ports.broker import Broker
from core_base.ports.kv import KeyValueStore
from core_base.settings import GenerationSettings

logger = logging.getLogger(__name__)

# Seconds a client is told to wait when the queue is too deep: about the time a
# worker needs to clear a batch of short tasks.
OVERLOAD_RETRY_AFTER_S = 10


def create_generation_app(
    spec: ServiceSpec,
    settings: GenerationSettings,
    *,
    broker: Broker,
    kv: KeyValueStore,
    manage_broker: bool = True,
) -> FastAPI:
    """Build the API of one generation service. ``manage_broker=False`` leaves
    connecting/closing the broker to the caller (``dev`` shares one broker)."""
    internal_token = settings.secret("internal_token")
    queue = spec.queue(settings)
    store = TaskStore(kv, spec.name, settings.result_ttl)
    registry = CollectorRegistry()
    submitted = Counter(
        "generation_tasks_submitted_total",
        "Tasks accepted by the API, by outcome",
        ["service", "outcome"],
        registry=registry,
    )

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        if manage_broker:
            await broker.connect()
        await broker.declare(queue)
        logger.info("%s API ready (queue %s)", spec.title, queue.name)
        try:
            yield
        finally:
            if manage_broker:
                await broker.close()

    app = FastAPI(
        title=f"{settings.api_name} {spec.title} API (internal)",
        version=settings.api_version,
        lifespan=lifespan,
    )
    install_error_handlers(app)
    app.add_middleware(HttpMetricsMiddleware, registry=registry)
    app.add_middleware(BodySizeLimitMiddleware, max_bytes=MAX_BODY_BYTES)
    app.include_router(health_router({"broker": broker.ping, "kv": kv.ping}))
    app.include_router(metrics_router(registry))
    authorized = Depends(require_bearer(lambda: [internal_token]))

    @app.post("/v1/generate", status_code=202, dependencies=[authorized])
    async def generate(request: GenerateRequest) -> JSONResponse:
        check_limits(request, settings)
        existing = await store.get(request.task_id)
        if existing is not None:
            submitted.labels(spec.name, "duplicate").inc()
            return JSONResponse(
                status_code=202,
                content={"task_id": request.task_id, "status": existing.status.value},
            )
        try:
            depth = await broker.depth(queue)
        except Exception as exc:
            raise UnavailableError("the task queue is unreachable") from exc
        if depth >= settings.max_queue_depth:
            submitted.labels(spec.name, "overloaded").inc()
            raise OverloadedError(
                f"{spec.title} queue is full ({depth} tasks waiting)", OVERLOAD_RETRY_AFTER_S
            )
        message = TaskMessage(
            **request.model_dump(), kind=spec.kind, model=settings.model or spec.default_model
        )
        try:
            # Publish before recording: a task recorded but never published would
            # look queued forever. A duplicate publish is harmless (the worker
            # skips tasks that already have a result).
            await broker.publish(queue, message.to_bytes(), message_id=request.task_id)
        except Exception as exc:
            submitted.labels(spec.name, "unavailable").inc()
            raise UnavailableError("the task could not be queued; retry later") from exc
        await store.create_if_absent(
            TaskResult(task_id=request.task_id, kind=spec.kind, status=TaskStatus.QUEUED)
        )
        submitted.labels(spec.name, "queued").inc()
        return JSONResponse(
            status_code=202, content={"task_id": request.task_id, "status": "queued"}
        )

    @app.get("/v1/tasks/{task_id}", dependencies=[authorized])
    async def get_task(task_id: Annotated[str, Path(max_length=128)]) -> TaskResult:
        result = await store.get(task_id)
        if result is None:
            raise NotFoundError(f"task {task_id} not found")
        return result

    return app


def check_limits(request: GenerateRequest, settings: GenerationSettings) -> None:
    """The deployment's limits (MAX_DURATION, MAX_PROMPT_LEN), tighter than the schema's."""
    if request.duration > settings.max_duration:
        raise InvalidInputError("duration", f"must be at most {settings.max_duration:g} seconds")
    if len(request.prompt) > settings.max_prompt_len:
        raise InvalidInputError("prompt", f"must be at most {settings.max_prompt_len} characters")
