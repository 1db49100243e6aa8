"""Reading a readiness ping: True, False, or ``UnavailableError`` saying why."""

from __future__ import annotations

from collections.abc import Awaitable, Callable

from core_base.errors import UnavailableError


async def ping_refusal(ping: Callable[[], Awaitable[bool]]) -> str | None:
    """Why ``ping`` says its dependency is down: its ``UnavailableError``'s message,
    or ``""`` for a bare False; None when it answers True."""
    try:
        ok = await ping()
    except UnavailableError as exc:
        return str(exc)
    return None if ok else ""
