"""The generation service's internal HTTP API (SPEC §2 step 5).

``POST /v1/generate`` validates a task, publishes it as a persistent message
(publisher-confirmed) and records it as ``queued``; ``POST /v1/generate/batch``
does the same for many tasks at once, with an outcome per task; ``GET
/v1/tasks/{id}`` returns a record. Only the App API calls it, with
``INTERNAL_TOKEN``.
"""

from __future__ import annotations

import logging
import time
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from typing import Annotated, Any

from fastapi import Depends, FastAPI, Path
from fastapi.responses import JSONResponse
from fastapi.routing import APIRoute
from prometheus_client import CollectorRegistry, Counter
from pydantic import ValidationError
from starlette.requests import Request
from starlette.responses import Response

from core_base.constants import MAX_INTERNAL_BODY_BYTES
from core_base.contracts import (
    BatchItemResult,
    GenerateBatch,
    GenerateBatchResult,
    GenerateRequest,
    TaskResult,
)
from core_base.domain import TaskStatus
from core_base.errors import InvalidInputError, NotFoundError, UnavailableError
from core_base.generation.admission import Admission, Admitted, Outcome
from core_base.generation.spec import ServiceSpec
from core_base.generation.task_store import TaskStore
from core_base.http.auth import check_bearer, require_bearer
from core_base.http.bodies import read_json_body
from core_base.http.errors import (
    UNSUPPORTED_ENCODING,
    BodySizeLimitMiddleware,
    error_responses,
    field_name,
    install_error_handlers,
    status_and_code,
)
from core_base.http.health import health_router
from core_base.http.metrics import HttpMetricsMiddleware, metrics_router
from core_base.http.plain_routes import docs_route, document_routes, json_response, plain_post
from core_base.ports.broker import Broker
from core_base.ports.kv import KeyValueStore
from core_base.settings import GenerationSettings

logger = logging.getLogger(__name__)

GENERATE_PATH = "/v1/generate"
BATCH_PATH = "/v1/generate/batch"
# Answers 204 to the internal token while the task store is reachable.
PING_PATH = "/v1/ping"
_UNAUTHORIZED = "missing or invalid internal token"
_TOO_LARGE = f"request body over {MAX_INTERNAL_BODY_BYTES} bytes"

# What generation_tasks_submitted_total counts (see its help).
SUBMIT_OUTCOMES = ("queued", "duplicate", "invalid", "overloaded", "unavailable", "canceled")


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
        "Submissions and cancels the API answered, by outcome: queued, duplicate (a task"
        " it has already), invalid (a batch item or a limit refused; a malformed request"
        " counts only in http_requests_total), overloaded, unavailable, canceled",
        ["service", "outcome"],
        registry=registry,
    )
    for outcome in SUBMIT_OUTCOMES:  # at 0 from the start, for rate() alerts
        submitted.labels(spec.name, outcome)

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
        redirect_slashes=False,  # as the App API: no redirect built from Host
    )
    install_error_handlers(app)
    # The metrics outermost: they count the body limit's 413s too.
    app.add_middleware(BodySizeLimitMiddleware, max_bytes=MAX_INTERNAL_BODY_BYTES)
    app.add_middleware(HttpMetricsMiddleware, registry=registry)
    app.include_router(health_router({"broker": broker.ping, "kv": kv.ping}))
    app.include_router(metrics_router(registry))
    admission = Admission(
        spec, settings, broker=broker, queue=queue, store=store, submitted=submitted
    )
    authorized = Depends(require_bearer(lambda: [internal_token]))

    async def generate(request: Request) -> Response:
        check_bearer(request.headers.get("authorization"), (internal_token,))
        task = await read_json_body(GenerateRequest, request)
        admitted = await admission.admit(task)
        return JSONResponse(
            status_code=202,
            content={"task_id": admitted.task_id, "status": admitted.status.value},
        )

    # A plain route, reading its body as the batch route and the App API's /v1/call
    # do: FastAPI's body parameter answered a body its JSON parser could not
    # decode (not UTF-8, nested too deep) with a 400 naming nothing.
    app.router.routes.append(plain_post(GENERATE_PATH, generate, name="generate"))

    async def generate_batch(request: Request) -> Response:
        check_bearer(request.headers.get("authorization"), (internal_token,))
        batch = await read_json_body(GenerateBatch, request)
        _refuse_repeated_task_ids(batch.tasks)
        results: list[BatchItemResult | None] = [None] * len(batch.tasks)
        valid: list[tuple[int, GenerateRequest]] = []
        for index, raw in enumerate(batch.tasks):
            try:
                valid.append((index, GenerateRequest.model_validate(raw)))
            except ValidationError as exc:
                results[index] = _invalid_item(raw, exc)
                submitted.labels(spec.name, "invalid").inc()
        outcomes = await admission.admit_many([task for _, task in valid])
        for (index, task), outcome in zip(valid, outcomes, strict=True):
            results[index] = _item_result(task.task_id, outcome)
        answer = GenerateBatchResult(results=[r for r in results if r is not None])
        return json_response(answer.model_dump_json().encode())

    # The App API's fan-out sends every task through here: a plain route.
    app.router.routes.append(plain_post(BATCH_PATH, generate_batch, name="generate_batch"))
    document_routes(app, [_generate_docs_route(), _batch_docs_route()])

    @app.get(
        PING_PATH,
        status_code=204,
        dependencies=[authorized],
        responses=error_responses({401: _UNAUTHORIZED, 503: "the task store is unreachable"}),
    )
    async def ping() -> Response:
        """For the App API's readiness: this API answers, takes the caller's token
        and reaches its task store. (A lookup of a made-up task told the same, and
        counted a 404 in the request metrics at every probe.)"""
        if not await kv.ping():
            raise UnavailableError("the task store is unreachable")
        return Response(status_code=204)

    @app.get(
        "/v1/tasks/{task_id}",
        dependencies=[authorized],
        responses=error_responses({401: _UNAUTHORIZED, 404: "no such task (or expired)"}),
    )
    async def get_task(task_id: Annotated[str, Path(max_length=128)]) -> TaskResult:
        result = await store.get(task_id)
        if result is None:
            raise NotFoundError(f"task {task_id} not found")
        return result

    @app.post(
        "/v1/tasks/{task_id}/cancel",
        dependencies=[authorized],
        responses=error_responses({401: _UNAUTHORIZED, 404: "not a task id"}),
    )
    async def cancel_task(task_id: Annotated[str, Path(max_length=128)]) -> TaskResult:
        """Record the task canceled unless it has ended: a worker that takes it
        then does not run it (nor runs it again after a crash). A generation under
        way is not interrupted; its result overwrites this record. A task not
        submitted yet (the cancel overtook its submit) is recorded canceled too,
        so that its submit is answered as a task that ended, and nothing runs. A
        result a worker writes while the cancel is recorded stays (compare and set)."""
        outcome = await store.cancel_unless_ended(task_id, time.time())
        if outcome is None:
            try:
                early = TaskResult(
                    task_id=task_id, kind=spec.kind, status=TaskStatus.CANCELED, error="canceled"
                )
            except ValidationError:
                raise NotFoundError(f"no task {task_id[:64]!r}") from None
            if await store.create_if_absent(early):
                submitted.labels(spec.name, "canceled").inc()
                return early
            # Submitted meanwhile.
            outcome = await store.cancel_unless_ended(task_id, time.time())
            if outcome is None:
                raise NotFoundError(f"task {task_id} not found")
        result, canceled_now = outcome
        if canceled_now:
            submitted.labels(spec.name, "canceled").inc()
        return result

    return app


def _generate_docs_route() -> APIRoute:
    """The OpenAPI description of the plain generate route; never served."""

    async def generate(request: GenerateRequest) -> JSONResponse:
        raise NotImplementedError

    return docs_route(
        GENERATE_PATH,
        generate,
        status_code=202,
        responses=error_responses(
            {
                401: _UNAUTHORIZED,
                413: _TOO_LARGE,
                415: UNSUPPORTED_ENCODING,
                422: "invalid task; the body names the field",
                503: "queue full, or the broker or task store unavailable",
            }
        ),
    )


def _batch_docs_route() -> APIRoute:
    """The OpenAPI description of the plain batch route; never served."""

    async def generate_batch(batch: GenerateBatch) -> GenerateBatchResult:
        """Many tasks in one request (the App API's fan-out): an outcome per task,
        in order, each what ``POST /v1/generate`` would have answered for it."""
        raise NotImplementedError

    return docs_route(
        BATCH_PATH,
        generate_batch,
        responses=error_responses(
            {
                401: _UNAUTHORIZED,
                413: _TOO_LARGE,
                415: UNSUPPORTED_ENCODING,
                422: "not a batch, or a task_id in it twice (each task's own problems "
                "are answered per task)",
            }
        ),
    )


def _refuse_repeated_task_ids(tasks: Sequence[dict[str, Any]]) -> None:
    """A task id twice in one batch refuses the batch (422 naming the repeat): two
    tasks under one id may differ, and which was meant cannot be told; taking the
    first would drop the other silently. Identical repeats too, for one plain rule:
    the App API's fan-out sends each (task, kind) once per batch. An id that is not
    a string is left to fail its own task's validation."""
    first_at: dict[str, int] = {}
    for index, raw in enumerate(tasks):
        task_id = raw.get("task_id")
        if not isinstance(task_id, str):
            continue
        if task_id in first_at:
            also = field_name(("tasks", first_at[task_id], "task_id"))
            raise InvalidInputError(
                field_name(("tasks", index, "task_id")),
                f"duplicate task_id {task_id[:64]!r} (also {also})",
            )
        first_at[task_id] = index


def _item_result(task_id: str, outcome: Outcome) -> BatchItemResult:
    if isinstance(outcome, Admitted):
        return BatchItemResult(task_id=task_id, status=outcome.status)
    status, code = status_and_code(outcome)
    field = outcome.field if isinstance(outcome, InvalidInputError) else None
    return BatchItemResult(
        task_id=task_id, http_status=status, error=code, message=str(outcome), field=field
    )


def _invalid_item(raw: dict[str, Any], exc: ValidationError) -> BatchItemResult:
    first = exc.errors()[0]
    field = field_name(first.get("loc", ()))
    message = str(first.get("msg", "invalid")).removeprefix("Value error, ")
    task_id = raw.get("task_id")
    return BatchItemResult(
        task_id=task_id if isinstance(task_id, str) else None,
        http_status=422,
        error="invalid_input",
        message=f"{field}: {message}",
        field=field,
    )
