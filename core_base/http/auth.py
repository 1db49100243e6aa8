"""Bearer-token auth for FastAPI routes, compared in constant time."""

from __future__ import annotations

import hmac
from collections.abc import Callable, Coroutine, Sequence
from typing import Annotated, Any

from fastapi import Depends, HTTPException, status
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from starlette.types import ASGIApp, Receive, Scope, Send

from core_base.http.errors import error_body, send_error

_bearer = HTTPBearer(auto_error=False)


def tokens_match(given: str, valid: Sequence[str]) -> bool:
    """True when ``given`` equals one of ``valid``; every candidate is compared, so
    the time taken does not tell which one (or how much of one) matched."""
    given_bytes = given.encode("utf-8")
    matched = False
    for token in valid:
        matched |= hmac.compare_digest(given_bytes, token.encode("utf-8"))
    return matched and bool(given)


def check_bearer(authorization: str | None, valid: Sequence[str]) -> None:
    """Refuse (401) unless the ``Authorization`` header is ``Bearer <one of valid>``;
    for routes that read their headers themselves."""
    scheme, _, token = (authorization or "").partition(" ")
    if scheme.lower() != "bearer" or not tokens_match(token.strip(), valid):
        raise _unauthorized()


def _unauthorized() -> HTTPException:
    return HTTPException(
        status_code=status.HTTP_401_UNAUTHORIZED,
        detail="missing or invalid bearer token",
        headers={"WWW-Authenticate": "Bearer"},
    )


def require_bearer(
    valid_tokens: Callable[[], Sequence[str]],
) -> Callable[..., Coroutine[Any, Any, None]]:
    """A dependency refusing requests without one of ``valid_tokens()`` (401).
    ``async`` so that FastAPI runs it on the event loop, not through the thread pool."""

    async def dependency(
        credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)],
    ) -> None:
        if credentials is None or not tokens_match(credentials.credentials, valid_tokens()):
            raise _unauthorized()

    return dependency


# The scope key under which BearerPrefixGuard names what it refused (metrics read it).
REFUSED_ROUTE_KEY = "audiocraft.refused_route"


class BearerPrefixGuard:
    """ASGI middleware refusing (401) every request under ``prefix`` without one of
    ``tokens``, before routing: an unknown path, a wrong method or a trailing
    slash there answers 401 too (not 404, 405 or a redirect), so nothing about
    the routes shows without a token. The routes check the token themselves as
    well (and document it)."""

    def __init__(self, app: ASGIApp, *, prefix: str, tokens: Sequence[str]) -> None:
        self.app = app
        self.prefix = prefix
        self.tokens = tokens

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["path"].startswith(self.prefix):
            authorization = next(
                (v.decode("latin-1") for k, v in scope["headers"] if k == b"authorization"), None
            )
            try:
                check_bearer(authorization, self.tokens)
            except HTTPException as refused:
                # For the request metrics: refused before routing, so no route
                # template; the prefix, not the raw path (unbounded labels).
                scope[REFUSED_ROUTE_KEY] = f"{self.prefix}*"
                body = error_body("unauthorized", str(refused.detail))
                await send_error(send, 401, body, [(b"www-authenticate", b"Bearer")])
                return
        await self.app(scope, receive, send)
