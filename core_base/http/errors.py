"""The one place where exceptions become HTTP responses.

Every error body has the same shape: ``{"error": <code>, "message": <text>,
"detail": [{"field": ..., "message": ...}]}``. Validation errors name the
offending field; unexpected exceptions become a 500 without internals.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping, Sequence
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from pydantic import BaseModel, Field
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from core_base.errors import (
    ConflictError,
    InvalidInputError,
    NotFoundError,
    OverloadedError,
    ServiceError,
    UnavailableError,
    UnsupportedEncodingError,
)
from core_base.http.bodies import capped_problems

logger = logging.getLogger(__name__)


class FieldProblem(BaseModel):
    field: str = Field(description="the offending field, dotted (`params.top_k`), or `body`")
    message: str


class ErrorBody(BaseModel):
    """The body of every error answer, whatever its status (documentation only:
    :func:`error_body` builds the answers)."""

    error: str = Field(
        description="machine-readable code: invalid_input, unauthorized, not_found, "
        "body_too_large, overloaded, unavailable, internal, ..."
    )
    message: str = Field(description="for people; names the field for invalid input")
    detail: list[FieldProblem] = Field(description="one entry per invalid field")


_RETRY_AFTER_HEADER = {
    "Retry-After": {"description": "seconds to wait before retrying", "schema": {"type": "integer"}}
}


_ACCEPT_ENCODING_HEADER = {
    "Accept-Encoding": {
        "description": "the codings a request body may have: identity (uncompressed)",
        "schema": {"type": "string"},
    }
}
# A route's 415 (see ``refuse_encoded_body``), described once.
UNSUPPORTED_ENCODING = "a compressed body (Content-Encoding other than identity)"


def error_responses(described: Mapping[int, str]) -> dict[int | str, dict[str, Any]]:
    """OpenAPI ``responses`` for a route's error statuses, each with its
    description and the :class:`ErrorBody` shape, and ``default`` for the rest
    (a 500, or a 503 while a dependency is down). Declaring a 422 (or
    ``default``) also replaces FastAPI's own 422 schema, which these answers
    do not have."""
    responses: dict[int | str, dict[str, Any]] = {
        status: {
            "model": ErrorBody,
            "description": description,
            **({"headers": _RETRY_AFTER_HEADER} if status in (429, 503) else {}),
            **({"headers": _ACCEPT_ENCODING_HEADER} if status == 415 else {}),
        }
        for status, description in described.items()
    }
    responses["default"] = {
        "model": ErrorBody,
        "description": "any other error, same shape (503 with Retry-After while a "
        "dependency is unavailable)",
    }
    return responses


def error_body(
    code: str, message: str, detail: list[dict[str, str]] | None = None
) -> dict[str, Any]:
    return {"error": code, "message": message, "detail": detail or []}


def field_name(loc: tuple[int | str, ...] | list[int | str]) -> str:
    """``("body", "params", "top_k")`` -> ``"params.top_k"``."""
    parts = [str(part) for part in loc]
    if parts and parts[0] in {"body", "query", "path", "header"}:
        parts = parts[1:]
    return ".".join(parts) or "body"


def status_and_code(exc: ServiceError) -> tuple[int, str]:
    """The HTTP status and error code of ``exc``, wherever it is reported (an
    error response, or one task's outcome in a batch)."""
    if isinstance(exc, UnsupportedEncodingError):
        return 415, "unsupported_media_type"
    if isinstance(exc, InvalidInputError):
        return 422, "invalid_input"
    if isinstance(exc, NotFoundError):
        return 404, "not_found"
    if isinstance(exc, ConflictError):
        return 409, "conflict"
    if isinstance(exc, OverloadedError):
        return 503, "overloaded"
    if isinstance(exc, UnavailableError):
        return 503, "unavailable"
    return 500, "internal"


def _field_detail(exc: ServiceError) -> list[dict[str, str]]:
    if isinstance(exc, InvalidInputError):
        return [{"field": exc.field, "message": exc.message}]
    return []


def _headers_of(exc: ServiceError) -> dict[str, str] | None:
    if isinstance(exc, UnsupportedEncodingError):
        # RFC 7694: say which codings a request body may have.
        return {"Accept-Encoding": "identity"}
    if isinstance(exc, OverloadedError):
        return {"Retry-After": str(exc.retry_after_s)}
    if isinstance(exc, UnavailableError):
        return {"Retry-After": "5"}
    return None


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(RequestValidationError)
    async def _validation(_: Request, exc: RequestValidationError) -> JSONResponse:
        detail = []
        for error in capped_problems(exc.errors()):
            message = str(error.get("msg", "invalid")).removeprefix("Value error, ")
            # Malformed JSON is the body's fault (FastAPI puts the offset in loc).
            loc = ("body",) if error.get("type") == "json_invalid" else error.get("loc", ())
            detail.append({"field": field_name(loc), "message": message})
        first = detail[0] if detail else {"field": "body", "message": "invalid"}
        return JSONResponse(
            status_code=422,
            content=error_body("invalid_input", f"{first['field']}: {first['message']}", detail),
        )

    @app.exception_handler(ServiceError)
    async def _service(_: Request, exc: ServiceError) -> JSONResponse:
        status, code = status_and_code(exc)
        if status == 500:
            logger.error("unhandled service error: %s", exc)
            body = error_body(code, "internal error")
        else:
            body = error_body(code, str(exc), _field_detail(exc))
        return JSONResponse(status_code=status, content=body, headers=_headers_of(exc))

    @app.exception_handler(StarletteHTTPException)
    async def _http(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        code = {
            400: "bad_request",
            401: "unauthorized",
            403: "forbidden",
            404: "not_found",
            405: "method_not_allowed",
        }
        return JSONResponse(
            status_code=exc.status_code,
            content=error_body(code.get(exc.status_code, "error"), str(exc.detail)),
            headers=getattr(exc, "headers", None),
        )

    @app.exception_handler(ClientDisconnect)
    async def _client_gone(request: Request, _: ClientDisconnect) -> Response:
        # The client hung up before its body arrived: no one to answer, nothing
        # wrong here. 499 as nginx logs it; counted with the 4xx, not as an error.
        logger.info("%s %s: client disconnected mid-request", request.method, request.url.path)
        return Response(status_code=499)

    @app.exception_handler(Exception)
    async def _unexpected(_: Request, exc: Exception) -> JSONResponse:
        logger.exception("unexpected error", exc_info=exc)
        return JSONResponse(status_code=500, content=error_body("internal", "internal error"))


class BodySizeLimitMiddleware:
    """Refuses request bodies over ``max_bytes`` with 413 before they are parsed:
    by ``Content-Length`` when given, else while the body streams in."""

    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = _content_length(scope)
        if declared is not None and declared > self.max_bytes:
            await _too_large(send, self.max_bytes)
            return
        received = 0
        response_started = False

        async def limited_receive() -> Message:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_bytes:
                    raise _BodyTooLarge
            return message

        async def tracking_send(message: Message) -> None:
            nonlocal response_started
            if message["type"] == "http.response.start":
                response_started = True
            await send(message)

        try:
            await self.app(scope, limited_receive, tracking_send)
        except _BodyTooLarge:
            if not response_started:
                await _too_large(send, self.max_bytes)


class _BodyTooLarge(Exception):
    pass


def _content_length(scope: Scope) -> int | None:
    for name, value in scope.get("headers", []):
        if name == b"content-length":
            try:
                return int(value)
            except ValueError:
                return None
    return None


async def _too_large(send: Send, max_bytes: int) -> None:
    body = error_body(
        "body_too_large",
        f"request body exceeds {max_bytes} bytes",
        [{"field": "body", "message": "too large"}],
    )
    await send_error(send, 413, body)


async def send_error(
    send: Send, status: int, body: dict[str, Any], headers: Sequence[tuple[bytes, bytes]] = ()
) -> None:
    """An error answer sent by ASGI middleware (which runs outside the handlers)."""
    # Rendered as the handlers' JSONResponse renders: one compact form for all errors.
    content = json.dumps(body, ensure_ascii=False, separators=(",", ":")).encode()
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [
                (b"content-type", b"application/json"),
                (b"content-length", str(len(content)).encode()),
                *headers,
            ],
        }
    )
    await send({"type": "http.response.body", "body": content})
