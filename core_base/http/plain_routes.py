"""Plain Starlette routes for the endpoints every workflow passes through.

FastAPI's parameter machinery (dependencies, body and header parameters, the
response model) costs about three times a small route's own work (measured on
``POST /v1/call``: 340 vs 90 µs per request). The routes on a workflow's path
(the marketplace's call, the sub-services' batch intake, the workers' callback)
are plain Starlette routes that answer exactly as a FastAPI route would (the
same 401, the same 422 naming the field, through the app's error handlers). A
FastAPI route built from a signature, never served, describes each one in the
OpenAPI schema (:func:`docs_route`, :func:`document_routes`).
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Sequence
from typing import Any

from fastapi import APIRouter, Depends, FastAPI
from fastapi.openapi.utils import get_openapi
from fastapi.routing import APIRoute
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import BaseRoute, Match, Route
from starlette.types import Scope

from core_base.http.auth import require_bearer


class LabelledRoute(Route):
    """A Starlette route that records itself in the scope as FastAPI's routes do
    (``scope["route"]``), so the request metrics label it by its path template."""

    def matches(self, scope: Scope) -> tuple[Match, Scope]:
        match, child_scope = super().matches(scope)
        if match is not Match.NONE:
            child_scope["route"] = self
        return match, child_scope


def plain_post(
    path: str, endpoint: Callable[[Request], Awaitable[Response]], *, name: str
) -> LabelledRoute:
    return LabelledRoute(path, endpoint, methods=["POST"], name=name)


def docs_route(path: str, signature: Callable[..., Any], **docs: Any) -> APIRoute:
    """The OpenAPI description of a plain ``POST`` route, from ``signature`` (a
    function never called) and FastAPI's route options; bearer-protected."""
    return APIRoute(
        path,
        signature,
        methods=["POST"],
        dependencies=[Depends(require_bearer(lambda: ()))],
        **docs,
    )


def document_routes(
    app: FastAPI, extra: Sequence[BaseRoute], webhooks: Sequence[BaseRoute] = ()
) -> None:
    """Add ``extra`` (descriptions of routes served outside FastAPI's machinery),
    and ``webhooks`` (requests the app sends), to the app's OpenAPI schema."""

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            app.openapi_schema = get_openapi(
                title=app.title,
                version=app.version,
                description=app.description,
                routes=[*extra, *app.routes],
                webhooks=webhooks,
            )
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]


def json_response(body: bytes, status_code: int = 200) -> Response:
    return Response(body, status_code=status_code, media_type="application/json")


def answer_head_too(router: APIRouter) -> None:
    """HEAD on each of ``router``'s GET routes, as GET without the body: load
    balancers and `curl -I` probe with it, and FastAPI's GET has none. Left out of
    the schema (a second operation with the GET's operationId would make it invalid)."""
    for route in list(router.routes):
        if isinstance(route, APIRoute) and route.methods == {"GET"}:
            # A route's path already holds the router's prefix; adding one adds it.
            path = route.path.removeprefix(router.prefix)
            router.add_api_route(path, route.endpoint, methods=["HEAD"], include_in_schema=False)
