"""HTTP routes: the marketplace API (``/v1``), the internal callback, signed files."""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import mimetypes
import time
import uuid
from typing import Annotated, Any
from urllib.parse import unquote_to_bytes

from fastapi import APIRouter, Depends, Header, HTTPException, Path, Query
from fastapi.responses import Response
from fastapi.routing import APIRoute
from pydantic import AfterValidator
from starlette.requests import Request
from starlette.routing import Route

from app_api.callback_guard import check_callback_url
from app_api.context import AppContext
from app_api.records import WorkflowRecord
from app_api.retention import drop_late_result
from app_api.schemas import (
    USER_ID_MAX_LEN,
    CallAccepted,
    CallRequest,
    ResultView,
    StatsView,
    call_request_model,
    printable_user_id,
)
from app_api.served_file import ServedFile
from app_api.stats import user_stats
from app_api.workflow import IdempotencyClaim
from core_base.constants import MAX_BODY_BYTES
from core_base.contracts import TaskResult
from core_base.domain import Kind, TaskStatus
from core_base.errors import (
    InvalidInputError,
    NotFoundError,
    OverloadedError,
    ServiceError,
    UnavailableError,
)
from core_base.http.auth import check_bearer, require_bearer
from core_base.http.bodies import read_body_as
from core_base.http.errors import UNSUPPORTED_ENCODING, error_responses, status_and_code
from core_base.http.plain_routes import answer_head_too, docs_route, json_response, plain_post
from core_base.settings import AppSettings

logger = logging.getLogger(__name__)

CALLBACK_PATH = "/internal/v1/callback"
# How long a cancel waits for the sub-services to confirm, at most.
_SUBSERVICE_CANCEL_WAIT_S = 2.0
_MAX_IDEMPOTENCY_KEY_LEN = 255
_UNAUTHORIZED = "missing or invalid bearer token"
_TOO_LARGE = f"request body over {MAX_BODY_BYTES} bytes, refused before it is read"


def marketplace_router(ctx: AppContext) -> APIRouter:
    settings = ctx.settings
    tokens = settings.marketplace_tokens
    router = APIRouter(
        prefix="/v1",
        tags=["marketplace"],
        dependencies=[Depends(require_bearer(lambda: tokens))],
        responses=error_responses({401: _UNAUTHORIZED}),
    )

    @router.get(
        "/result/{task_id}",
        response_model=ResultView,
        responses=error_responses({404: "no such task (an id of any shape)"}),
    )
    async def result(task_id: str) -> ResultView:
        """Status, progress and outputs (with presigned URLs) of a workflow."""
        canonical = _canonical_task_id(task_id)
        record = await ctx.workflows.load(canonical) if canonical else None
        if record is None:
            raise NotFoundError(f"no task {task_id[:64]!r}")
        return await ctx.renderer.render(record)

    @router.post(
        "/cancel/{task_id}",
        response_model=ResultView,
        responses=error_responses(
            {
                404: "no such task (an id of any shape)",
                409: "the task has already succeeded or failed: nothing to cancel",
            }
        ),
    )
    async def cancel(task_id: str) -> ResultView:
        """Cancel a task that has not finished: its kinds still queued or running end
        ``canceled`` (the result and the stats say so, and the webhook is sent), and
        the sub-services are asked not to run them. Audio being generated at that
        moment is finished by its worker but not delivered. A repeated cancel is
        answered like the first."""
        canonical = _canonical_task_id(task_id)
        if canonical is None:
            raise NotFoundError(f"no task {task_id[:64]!r}")
        record = await ctx.workflows.cancel(canonical)
        # Every canceled kind, not only those this call canceled: a retried cancel
        # (the first one failed on its way) asks again.
        canceled = [o.kind for o in record.outputs if o.status == TaskStatus.CANCELED]
        await _ask_subservices_to_cancel(ctx, canonical, canceled)
        return await ctx.renderer.render(record)

    @router.get(
        # :path: a user id may hold a "/" (sent as %2F), as /v1/call accepts it.
        "/stats/{user_id:path}",
        response_model=StatsView,
        responses=error_responses({422: "invalid user_id, since or until; names the field"}),
    )
    async def stats(
        request: Request,
        user_id: Annotated[
            str,
            Path(min_length=1, max_length=USER_ID_MAX_LEN),
            AfterValidator(printable_user_id),
        ],
        since: Annotated[str | None, Query(max_length=64, description=_BOUND_DOCS)] = None,
        until: Annotated[str | None, Query(max_length=64, description=_BOUND_DOCS)] = None,
    ) -> StatsView:
        """Per-user counters; ``since``/``until`` bound the workflows' creation time."""
        if "\ufffd" in user_id and not _path_is_utf8(request):
            # The server decoded the bytes that are no UTF-8 as U+FFFD: that would
            # be the counters of a user really called so.
            raise InvalidInputError("user_id", "its %-escapes must be UTF-8")
        return await user_stats(ctx.db, user_id, since, until)

    answer_head_too(router)
    return router


_CALL_PATH = "/v1/call"
_CALL_DOCS: dict[str, Any] = {
    "status_code": 202,
    "response_model": CallAccepted,
    "tags": ["marketplace"],
    "responses": error_responses(
        {
            401: _UNAUTHORIZED,
            413: _TOO_LARGE,
            415: UNSUPPORTED_ENCODING,
            422: "invalid input (body or Idempotency-Key); the body names the field",
            503: "overloaded, a dependency unavailable, or the service stopping; retry after"
            " Retry-After seconds",
        }
    ),
}


_IDEMPOTENCY_KEY_DOCS = (
    "Optional; 1-255 printable ASCII characters. Another call of the same user_id with"
    " the same key and the same body within 24 hours creates nothing and gets the first"
    " call's answer (its task_id, status queued: GET /v1/result says where it is now);"
    " with another body, a 422. Keys of different user_ids never meet."
)
_BOUND_DOCS = (
    "ISO date or datetime, UTC unless it carries an offset; a bare date is a whole day"
    " (since: from its start; until: through its end). Bounds the tasks' creation time."
)


def call_route(ctx: AppContext) -> Route:
    """``POST /v1/call`` as a plain route (see ``core_base.http.plain_routes``);
    :func:`call_docs_route` describes it in the OpenAPI schema."""
    tokens = ctx.settings.marketplace_tokens
    model = call_request_model(ctx.settings.max_duration, ctx.settings.max_prompt_len)

    async def call(request: Request) -> Response:
        check_bearer(request.headers.get("authorization"), tokens)
        body = await read_body_as(model, request)
        try:
            accepted = await _start_workflow(ctx, body, _idempotency_key(request))
        except ServiceError as exc:
            ctx.metrics.count_call(body.kinds, status_and_code(exc)[0])
            raise
        ctx.metrics.count_call(body.kinds, 202)
        return json_response(accepted.model_dump_json().encode(), 202)

    return plain_post(_CALL_PATH, call, name="call")


def call_docs_route(settings: AppSettings) -> APIRoute:
    """The OpenAPI description of :func:`call_route`, from this signature (with the
    call body of this deployment's limits); never served."""

    async def call(
        body: CallRequest,
        idempotency_key: Annotated[
            str | None, Header(alias="Idempotency-Key", description=_IDEMPOTENCY_KEY_DOCS)
        ] = None,
    ) -> CallAccepted:
        """Start a workflow: generate each requested kind, then notify the client."""
        raise NotImplementedError

    call.__annotations__["body"] = call_request_model(
        settings.max_duration, settings.max_prompt_len
    )
    return docs_route(_CALL_PATH, call, **_CALL_DOCS)


def callback_route(ctx: AppContext, internal_token: str) -> Route:
    """The workers' internal callback as a plain route: a task's progress or
    outcome, folded in idempotently. Only ``INTERNAL_TOKEN`` opens it."""
    tokens = (internal_token,)

    async def callback(request: Request) -> Response:
        check_bearer(request.headers.get("authorization"), tokens)
        result = await read_body_as(TaskResult, request)
        try:
            changed = await ctx.workflows.apply(result)
        except NotFoundError:
            if not await drop_late_result(ctx.db, ctx.storage, result):
                raise
            changed = False  # its workflow finished and is gone: nothing to fold in
        return json_response(b'{"changed":true}' if changed else b'{"changed":false}')

    return plain_post(CALLBACK_PATH, callback, name="callback")


def callback_docs_route() -> APIRoute:
    """The OpenAPI description of :func:`callback_route`; never served."""

    async def callback(result: TaskResult) -> dict[str, bool]:
        """A sub-service worker reports a task's progress or outcome (idempotent)."""
        raise NotImplementedError

    return docs_route(
        CALLBACK_PATH,
        callback,
        tags=["internal"],
        responses=error_responses(
            {
                401: "missing or invalid internal token (a marketplace token never opens it)",
                413: _TOO_LARGE,
                415: UNSUPPORTED_ENCODING,
                422: "not a task result; the body names the field",
            }
        ),
    )


def webhook_docs_routes() -> list[APIRoute]:
    """The client webhook, as OpenAPI's ``webhooks`` describe a request this API
    sends; never served."""
    hooks = APIRouter()

    @hooks.post(
        "task-finished",
        summary="A task finished: its final result",
        response_description="delivered: any 2xx, whatever its body",
        responses={"default": {"description": "retried later; 410 Gone stops the retries"}},
    )
    async def task_finished(
        result: ResultView,
        webhook_id: Annotated[
            str, Header(description="the same on every attempt of one task's webhook: dedupe")
        ],
        webhook_timestamp: Annotated[str, Header(description="Unix seconds of this attempt")],
        webhook_signature: Annotated[
            str,
            Header(
                description='v1,<base64 HMAC-SHA256 of "{webhook-id}.{webhook-timestamp}.{body}">'
                " with WEBHOOK_SECRET's key (Standard Webhooks)"
            ),
        ],
    ) -> None:
        """POSTed to the call's callback_url, else MARKETPLACE_CALLBACK, with fresh
        signed links on each attempt. Anything but a 2xx within 10 s is retried with
        doubling backoff from about 5 s up to an hour apart, for 24 hours; 410 Gone
        stops the retries."""
        raise NotImplementedError

    return [route for route in hooks.routes if isinstance(route, APIRoute)]


def files_router(ctx: AppContext) -> APIRouter:
    """Serves ``FileStorage`` objects behind its signed URLs (the embedded S3)."""
    from core_base.adapters.storage_files import FileStorage

    storage = ctx.storage
    assert isinstance(storage, FileStorage)
    router = APIRouter(tags=["files"])

    @router.get("/files/{key:path}", include_in_schema=False)
    async def serve(key: str, expires: int = 0, signature: str = "") -> ServedFile:
        if not storage.verify(key, expires, signature):
            raise HTTPException(status_code=403, detail="invalid or expired signature")
        try:
            path = storage.path_for(key)
        except InvalidInputError:
            raise NotFoundError("no such file") from None
        if not await asyncio.to_thread(path.is_file):
            raise NotFoundError("no such file")
        media_type = mimetypes.guess_type(path.name)[0] or "application/octet-stream"
        if path.suffix == ".flac":
            media_type = "audio/flac"
        return ServedFile(path, media_type=media_type)

    return router


async def _start_workflow(
    ctx: AppContext, body: CallRequest, idempotency_key: str | None
) -> CallAccepted:
    settings = ctx.settings
    if body.melody_url is not None:
        raise InvalidInputError(
            "melody_url",
            "melody conditioning is not available on this deployment; omit melody_url",
        )
    if body.callback_url is not None:
        await check_callback_url(body.callback_url, allow_private=settings.allow_private_callbacks)
    claim = None
    if idempotency_key is not None:
        claim = IdempotencyClaim(
            caller=body.user_id, key=_check_idempotency_key(idempotency_key), body_hash=_hash(body)
        )
    refusal = _refusal(ctx)
    if refusal is not None:
        # A replay of an accepted call is still answered: it adds nothing.
        existing = await ctx.workflows.replay(claim) if claim is not None else None
        if existing is not None:
            return CallAccepted(task_id=existing)
        raise refusal
    now = time.time()
    record = WorkflowRecord(
        task_id=str(uuid.uuid4()),
        user_id=body.user_id,
        kinds=list(body.kinds),
        request=body.model_dump(
            mode="json", include={"prompt", "duration", "format", "seed", "params"}
        ),
        callback_url=body.callback_url,
        created_at=now,
        updated_at=now,
    )
    # Counted from the check on: nothing is awaited between the two.
    with ctx.backlog.creating():
        created = await ctx.workflows.create(record, claim)
    if created.created:
        ctx.backlog.created()
        ctx.fanout.submit_new(record)
        ctx.wake("fanout")
    return CallAccepted(task_id=created.task_id)


def _refusal(ctx: AppContext) -> ServiceError | None:
    """Why no new workflow is taken now (shutting down, overloaded), or None."""
    if not ctx.taking_calls:
        return UnavailableError("this App API is shutting down; retry in a moment")
    active = ctx.backlog.active
    if active >= ctx.settings.max_queue_depth:
        return OverloadedError(
            f"{active} workflows in progress; try again later", ctx.options.overload_retry_after_s
        )
    return None


async def _ask_subservices_to_cancel(ctx: AppContext, task_id: str, kinds: list[Kind]) -> None:
    """Best effort, briefly: the workflow is canceled whatever they answer; a
    sub-service that does not hear of it runs the task, whose result is ignored."""
    try:
        async with asyncio.timeout(_SUBSERVICE_CANCEL_WAIT_S):
            answers = await asyncio.gather(
                *(ctx.subservices.cancel(kind, task_id) for kind in kinds)
            )
    except TimeoutError:
        answers = [False] * len(kinds)
    for kind, answered in zip(kinds, answers, strict=True):
        if not answered:
            logger.info("cancel %s: %s did not confirm; its result will be ignored", task_id, kind)


def _path_is_utf8(request: Request) -> bool:
    raw_path = request.scope.get("raw_path")
    if raw_path is None:
        return True  # a server that does not say: nothing to check against
    try:
        # Some servers append the query; ASGI's raw_path is the path alone.
        unquote_to_bytes(raw_path.split(b"?", 1)[0]).decode("utf-8")
    except UnicodeDecodeError:
        return False
    return True


def _idempotency_key(request: Request) -> str | None:
    keys = request.headers.getlist("idempotency-key")
    if len(keys) > 1:
        # Which one the client meant is not ours to guess (a proxy may have added one).
        raise InvalidInputError("Idempotency-Key", f"send one header, not {len(keys)}")
    return keys[0] if keys else None


def _check_idempotency_key(key: str) -> str:
    if not 1 <= len(key) <= _MAX_IDEMPOTENCY_KEY_LEN or not all(
        "\x21" <= char <= "\x7e" for char in key
    ):
        raise InvalidInputError(
            "Idempotency-Key",
            f"must be 1-{_MAX_IDEMPOTENCY_KEY_LEN} printable ASCII characters without spaces",
        )
    return key


def _hash(body: CallRequest) -> str:
    # melody_url is left out (it is always refused) so that hashes of keys stored
    # before it existed still match.
    fields = body.model_dump(mode="json", exclude={"melody_url"})
    canonical = json.dumps(fields, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canonical.encode()).hexdigest()


def _canonical_task_id(task_id: str) -> str | None:
    try:
        return str(uuid.UUID(task_id))
    except ValueError:
        return None
