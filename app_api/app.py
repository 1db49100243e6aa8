"""``create_app``: one App API instance from its settings and adapters.

Nothing happens at import. The lifespan starts the background loops (fan-out,
webhook deliveries, reconciler, metrics) and stops them; the adapters belong to
the caller, who connects and closes them.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI
from prometheus_client import CollectorRegistry

from app_api.backlog import Backlog
from app_api.best_effort import BestEffort
from app_api.cache import WorkflowCache
from app_api.context import AppContext
from app_api.fanout import LEASE_S as FANOUT_LEASE_S
from app_api.fanout import Fanout
from app_api.loops import Loop
from app_api.metrics import AppMetrics
from app_api.options import AppOptions
from app_api.reconcile import Reconciler
from app_api.records import WorkflowRecord
from app_api.remembered import RememberedWorkflows
from app_api.retention import Retention
from app_api.routes import (
    CALLBACK_PATH,
    call_docs_route,
    call_route,
    callback_docs_route,
    callback_route,
    files_router,
    marketplace_router,
    webhook_docs_routes,
)
from app_api.signing import signing_key
from app_api.subservices import SubServices
from app_api.views import ResultRenderer
from app_api.webhooks import WebhookDispatcher
from app_api.workflow import FinishedWorkflow, Workflows
from core_base.constants import MAX_BODY_BYTES
from core_base.domain import Kind
from core_base.errors import SettingsError
from core_base.http.auth import BearerPrefixGuard
from core_base.http.client import HttpClient
from core_base.http.errors import BodySizeLimitMiddleware, install_error_handlers
from core_base.http.health import Check, health_router
from core_base.http.metrics import HttpMetricsMiddleware, metrics_router
from core_base.http.plain_routes import document_routes
from core_base.ports.database import Database
from core_base.ports.kv import KeyValueStore
from core_base.ports.storage import ObjectStorage
from core_base.services import service_spec
from core_base.settings import AppSettings

logger = logging.getLogger(__name__)


def create_app(
    settings: AppSettings,
    *,
    db: Database,
    kv: KeyValueStore,
    storage: ObjectStorage,
    http_client: HttpClient | None = None,
    options: AppOptions | None = None,
) -> FastAPI:
    """Build the App API. ``http_client`` (for tests) replaces both the pooled client
    of the sub-service calls and the one of the client webhooks."""
    options = options or AppOptions()
    internal_token = settings.secret("internal_token")
    key = signing_key(settings.secret("webhook_secret"))
    settings.require("marketplace_token")
    if not settings.marketplace_tokens:
        raise SettingsError("MARKETPLACE_TOKEN: no token in the list")
    if internal_token in settings.marketplace_tokens:
        raise SettingsError("MARKETPLACE_TOKEN: must not contain INTERNAL_TOKEN")

    owned_clients: list[HttpClient] = []
    if http_client is None:
        # The sub-services: transport retries for refused connections (a restarting
        # pod), keep-alive for up to as many connections as fan-out batches in flight.
        internal_http = HttpClient(max_connections=200)
        # Webhooks go to the internet: their retries are the delivery schedule's.
        webhook_http = HttpClient(connect_retries=0)
        owned_clients = [internal_http, webhook_http]
    else:
        internal_http = webhook_http = http_client

    registry = CollectorRegistry()
    metrics = AppMetrics(registry)
    loops: dict[str, Loop] = {}
    # The App API answers without Redis (from PostgreSQL) when it is down or slow.
    redis = BestEffort("Redis (workflow cache, live progress)")
    renderer = ResultRenderer(
        storage,
        kv,
        presign_expires_s=settings.presign_expires,
        ttl_s=settings.result_ttl,
        guard=redis,
    )
    backlog = Backlog(db)

    async def render_webhook(record: WorkflowRecord) -> bytes:
        view = await renderer.render(record, live=False)
        return view.model_dump_json().encode()

    def on_finished(finished: FinishedWorkflow) -> None:
        backlog.finished()
        if finished.delivery is not None:
            webhooks.submit_new(
                finished.delivery,
                finished.record,
                finished.body,
                leased_until=finished.delivery_leased_until,
            )

    cache = WorkflowCache(kv, settings.result_ttl, redis)
    workflows = Workflows(
        db,
        cache,
        metrics,
        default_callback_url=settings.marketplace_callback,
        on_finished=on_finished,
        on_unanswered=lambda record, unanswered: fanout.unanswered(record, unanswered),
        render_webhook=render_webhook,
        fanout_lease_s=FANOUT_LEASE_S,
        delivery_lease_s=options.webhook_lease_s,
        remembered=RememberedWorkflows(options.remembered_workflows),
    )
    subservices = SubServices(internal_http, settings, internal_token)
    fanout = Fanout(
        db,
        workflows,
        subservices,
        metrics,
        options,
        callback_url=settings.app_api_url.rstrip("/") + CALLBACK_PATH,
    )

    trusted = frozenset({settings.marketplace_callback} if settings.marketplace_callback else ())
    webhooks = WebhookDispatcher(
        db,
        webhook_http,
        metrics,
        options,
        key=key,
        render=render_webhook,
        allow_private=settings.allow_private_callbacks,
        trusted_urls=trusted,
    )

    def redispatch() -> None:
        fanout.poll_soon()
        loops["fanout"].wake()

    reconciler = Reconciler(db, workflows, subservices, storage, options, on_redispatch=redispatch)
    retention = Retention(db, storage, cache, metrics, retention_s=settings.retention_days * 86400)

    async def refresh_metrics() -> None:
        await metrics.refresh_active(db)

    loops.update(
        fanout=Loop("app-api fan-out", fanout.step, options.poll_interval_s),
        webhooks=Loop("app-api webhooks", webhooks.run_once, options.poll_interval_s),
        reconcile=Loop("app-api reconciler", reconciler.run_once, options.reconcile_interval_s),
        metrics=Loop("app-api metrics", refresh_metrics, options.metrics_refresh_s),
        backlog=Loop("app-api backlog", backlog.refresh, options.backlog_refresh_s),
    )
    if retention.enabled:
        loops["retention"] = Loop(
            "app-api retention", retention.run_once, options.retention_interval_s
        )
    ctx = AppContext(
        settings=settings,
        options=options,
        db=db,
        kv=kv,
        storage=storage,
        metrics=metrics,
        workflows=workflows,
        renderer=renderer,
        subservices=subservices,
        fanout=fanout,
        webhooks=webhooks,
        reconciler=reconciler,
        backlog=backlog,
        loops=loops,
    )

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        for loop in loops.values():
            loop.start()
        try:
            yield
        finally:
            try:
                await _stop(options, loops, fanout, webhooks, workflows)
            finally:
                for client in owned_clients:
                    await client.aclose()

    app = FastAPI(
        title=f"{settings.api_name} App API",
        version=settings.api_version,
        description="Marketplace API: text-to-audio (sound effects, music) with signed webhooks.",
        lifespan=lifespan,
        docs_url="/docs",
        # "/v1/call/" is a 404, not a redirect built from the Host header (to http
        # behind a TLS proxy, where a client may follow it with its token).
        redirect_slashes=False,
    )
    app.state.ctx = ctx
    install_error_handlers(app)
    app.router.routes.append(call_route(ctx))
    app.router.routes.append(callback_route(ctx, internal_token))
    app.include_router(marketplace_router(ctx))
    if _is_file_storage(storage):
        app.include_router(files_router(ctx))
    app.include_router(health_router(_readiness_checks(ctx), stopping=lambda: not ctx.taking_calls))
    app.include_router(metrics_router(registry))
    document_routes(
        app, [call_docs_route(settings), callback_docs_route()], webhooks=webhook_docs_routes()
    )
    app.add_middleware(BearerPrefixGuard, prefix="/v1/", tokens=settings.marketplace_tokens)
    # Oversized bodies are refused before anything else reads them; outside it
    # (added last, so it runs first) the metrics count that 413 as any answer.
    app.add_middleware(BodySizeLimitMiddleware, max_bytes=MAX_BODY_BYTES)
    app.add_middleware(HttpMetricsMiddleware, registry=registry)
    return app


async def _stop(
    options: AppOptions,
    loops: dict[str, Loop],
    fanout: Fanout,
    webhooks: WebhookDispatcher,
    workflows: Workflows,
) -> None:
    """After the server's drain: nothing more is claimed; the loops' rounds and the
    webhook attempts under way get one grace together; then, each bounded and all
    at once, what was not begun is handed back to the other App APIs, refused
    calls are settled and the last inserts waited for: at most about
    ``stop_grace_s`` + ``stop_hand_back_s``, after the server's drain
    (GRACEFUL_SHUTDOWN_S)."""
    fanout.stop_claiming()
    webhooks.stop_claiming()
    outcomes = await asyncio.gather(
        *(loop.stop(options.stop_grace_s) for loop in loops.values()),
        webhooks.finish(options.stop_grace_s),
        return_exceptions=True,
    )
    outcomes += await asyncio.gather(
        fanout.hand_back(),
        webhooks.hand_back(),
        _settle_before_exit(fanout, options.stop_hand_back_s),
        _close_workflows(workflows, options.stop_hand_back_s),
        return_exceptions=True,
    )
    for outcome in outcomes:
        if isinstance(outcome, BaseException):  # one step's failure must not skip the others
            logger.error("stopping: a step failed", exc_info=outcome)


async def _close_workflows(workflows: Workflows, timeout_s: float) -> None:
    """The inserts still in flight (their callers are gone after the drain), briefly."""
    try:
        await asyncio.wait_for(workflows.close(), timeout_s)
    except TimeoutError:
        logger.warning("stopping: inserts still unanswered by PostgreSQL left behind")


async def _settle_before_exit(fanout: Fanout, timeout_s: float) -> None:
    """Refused calls' workflows left to settle (see :meth:`Fanout.settle_unanswered`):
    one last try, briefly; those left would run when their fan-out lease ends."""
    try:
        settled = await asyncio.wait_for(fanout.settle_unanswered(), timeout_s)
    except TimeoutError:
        settled = False
    if not settled:
        left = fanout.left_unsettled()
        logger.warning(
            "stopping with %d refused call(s) whose workflows may have been written after"
            " all; each runs if it was (its caller was told to retry): %s",
            len(left),
            ", ".join(left),
        )


def _readiness_checks(ctx: AppContext) -> dict[str, Check]:
    checks: dict[str, Check] = {"database": ctx.db.ping, "kv": ctx.kv.ping}
    for kind in Kind:

        async def reachable(kind: Kind = kind) -> bool:
            return await ctx.subservices.reachable(kind)

        checks[service_spec(kind).name] = reachable
    return checks


def stop_taking_calls(app: FastAPI) -> None:
    """Refuse new calls (503, retry) from now on; everything else keeps answering,
    so that work under way can still report and be read."""
    ctx: AppContext = app.state.ctx
    ctx.taking_calls = False


def _is_file_storage(storage: ObjectStorage) -> bool:
    from core_base.adapters.storage_files import FileStorage

    return isinstance(storage, FileStorage)
