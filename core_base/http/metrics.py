"""Prometheus metrics: a registry per app (tests build many apps in one process)
and a middleware counting requests by route and status class."""

from __future__ import annotations

import time
from typing import Any

from fastapi import APIRouter, Response
from fastapi.responses import PlainTextResponse
from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    GCCollector,
    Histogram,
    PlatformCollector,
    ProcessCollector,
    disable_created_metrics,
    generate_latest,
)
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from core_base.http.auth import REFUSED_ROUTE_KEY
from core_base.http.plain_routes import answer_head_too

# No "<counter>_created" series beside each counter and histogram: they doubled
# the series a scrape stores, and Prometheus has no use for them.
disable_created_metrics()  # type: ignore[no-untyped-call]


def metrics_router(registry: CollectorRegistry) -> APIRouter:
    """``GET /metrics``: ``registry``, to which the process's own metrics are added
    (``process_*``: CPU, resident memory, open files, start time; ``python_*``:
    version, garbage collection), which an on-call engineer reads first."""
    add_process_metrics(registry)
    router = APIRouter(tags=["health"])

    @router.get("/metrics", response_class=PlainTextResponse)
    async def metrics() -> Response:
        return Response(generate_latest(registry), media_type=CONTENT_TYPE_LATEST)

    answer_head_too(router)
    return router


def add_process_metrics(registry: CollectorRegistry) -> None:
    """The process and Python collectors, on a registry of a service's own (the
    default registry has them; ours start empty)."""
    ProcessCollector(registry=registry)
    PlatformCollector(registry=registry)
    GCCollector(registry=registry)


class HttpMetricsMiddleware:
    """``http_requests_total{route,method,status_class}`` and latency by route.

    The route template (``/v1/result/{task_id}``), not the raw path, is the label,
    so label cardinality stays bounded whatever clients send.
    """

    def __init__(self, app: ASGIApp, registry: CollectorRegistry) -> None:
        self.app = app
        self.requests = Counter(
            "http_requests_total",
            "HTTP requests by route, method and status class",
            ["route", "method", "status_class"],
            registry=registry,
        )
        self.latency = Histogram(
            "http_request_duration_seconds",
            "HTTP request latency by route",
            ["route", "method"],
            registry=registry,
        )
        self._series: dict[tuple[str, str, int], tuple[Any, Any]] = {}
        self._endpoint_templates: dict[Any, str | None] = {}

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        status_code = 500

        async def recording_send(message: Message) -> None:
            nonlocal status_code
            if message["type"] == "http.response.start":
                status_code = int(message["status"])
            await send(message)

        try:
            await self.app(scope, receive, recording_send)
        finally:
            route = scope.get("route")
            template = (
                getattr(route, "path", None)
                or scope.get(REFUSED_ROUTE_KEY)
                or self._template_of_endpoint(scope)
                or "unmatched"
            )
            key = (template, str(scope.get("method", "")), status_code // 100)
            series = self._series.get(key)
            if series is None:
                series = self._series.setdefault(key, self._series_for(*key))
            series[0].inc()
            series[1].observe(time.perf_counter() - started)

    def _template_of_endpoint(self, scope: Scope) -> str | None:
        """The path of a plain Starlette route (FastAPI's ``/openapi.json`` and
        ``/docs``), which names its endpoint in the scope but not itself."""
        endpoint = scope.get("endpoint")
        if endpoint is None:
            return None
        if endpoint not in self._endpoint_templates:
            routes = getattr(scope.get("app"), "routes", ())
            paths = [r.path for r in routes if getattr(r, "endpoint", None) is endpoint]
            self._endpoint_templates[endpoint] = paths[0] if len(paths) == 1 else None
        return self._endpoint_templates[endpoint]

    def _series_for(self, template: str, method: str, status_class: int) -> tuple[Any, Any]:
        # ``labels()`` builds and looks up its key on every call: the children are
        # kept here (bounded: route templates x methods x status classes).
        return (
            self.requests.labels(template, method, f"{status_class}xx"),
            self.latency.labels(template, method),
        )
