"""``/healthz`` (the process is alive) and ``/readyz`` (it can do its job)."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Mapping
from typing import Any

from fastapi import APIRouter
from fastapi.responses import JSONResponse
from pydantic import BaseModel, Field

from core_base.errors import UnavailableError
from core_base.http.plain_routes import answer_head_too

logger = logging.getLogger(__name__)

Check = Callable[[], Awaitable[bool]]
# A readiness probe must answer quickly even when a dependency hangs.
CHECK_TIMEOUT_S = 2.0


async def run_checks(
    checks: Mapping[str, Check], last: dict[str, bool] | None = None
) -> dict[str, bool]:
    """Each check's answer. With ``last`` (the previous answers, updated here), a
    check that stops passing is logged once, with why (the probe's body only says
    false), and again when it passes again: probes come every few seconds."""

    async def one(name: str, check: Check) -> bool:
        try:
            ok = await asyncio.wait_for(check(), timeout=CHECK_TIMEOUT_S)
            reason = "" if ok else "the check said no"
        except TimeoutError:
            ok, reason = False, f"no answer within {CHECK_TIMEOUT_S:g} s"
        except UnavailableError as exc:  # says why itself
            ok, reason = False, str(exc)[:200]
        except Exception as exc:
            ok, reason = False, f"{type(exc).__name__}: {str(exc)[:200]}"
        if last is not None and last.get(name, True) != ok:
            if ok:
                logger.info("readiness: %s ready again", name)
            else:
                logger.warning("readiness: %s not ready (%s)", name, reason)
        if last is not None:
            last[name] = ok
        return bool(ok)

    results = await asyncio.gather(*(one(name, check) for name, check in checks.items()))
    return dict(zip(checks.keys(), results, strict=True))


class Readiness(BaseModel):
    """The body of ``/readyz`` (documentation only), 200 or 503 alike."""

    status: str = Field(description="`ready` or `not_ready`")
    checks: dict[str, bool] = Field(description="each dependency: reachable or not")
    details: dict[str, Any] | None = Field(
        default=None, description="a worker's state, queue and model"
    )


_READINESS_RESPONSES: dict[int | str, dict[str, Any]] = {
    503: {"model": Readiness, "description": "not ready: a dependency is unreachable"}
}


def health_router(
    checks: Mapping[str, Check],
    details: Callable[[], Mapping[str, Any]] | None = None,
) -> APIRouter:
    router = APIRouter(tags=["health"])

    @router.get("/healthz")
    async def healthz() -> dict[str, str]:
        return {"status": "ok"}

    last: dict[str, bool] = {}

    @router.get("/readyz", response_model=Readiness, responses=_READINESS_RESPONSES)
    async def readyz() -> JSONResponse:
        results = await run_checks(checks, last)
        ready = all(results.values())
        body: dict[str, Any] = {"status": "ready" if ready else "not_ready", "checks": results}
        if details is not None:
            body["details"] = dict(details())
        return JSONResponse(status_code=200 if ready else 503, content=body)

    answer_head_too(router)
    return router
