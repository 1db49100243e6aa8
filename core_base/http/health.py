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


class ReadinessChecks:
    """The checks of ``/readyz``, each answered within :data:`CHECK_TIMEOUT_S`.

    A check that does not answer in time is left to finish on its own (bounded by
    its client's timeouts) instead of being cancelled and awaited: a cancelled
    query can take seconds to let go of its connection, which held the probe up.
    Meanwhile later probes wait on that same check instead of starting another,
    so a hung dependency never has more than one check of it in flight (a boto3
    call holds a thread for as long as it hangs). A check that stops passing is
    logged once, with why (the probe's body only says false), and again when it
    passes again: probes come every few seconds."""

    def __init__(self, checks: Mapping[str, Check]) -> None:
        self._checks = checks
        self._last: dict[str, bool] = {}
        self._in_flight: dict[str, asyncio.Task[bool]] = {}

    async def run(self) -> dict[str, bool]:
        """Each check's answer, by name."""
        names = list(self._checks)
        results = await asyncio.gather(*(self._one(name) for name in names))
        return dict(zip(names, results, strict=True))

    async def _one(self, name: str) -> bool:
        task = self._in_flight.get(name)
        # A task of another event loop (an app served again by a new one) is never
        # waited on: that loop may be gone with it.
        if task is None or task.done() or task.get_loop() is not asyncio.get_running_loop():
            task = asyncio.ensure_future(self._checks[name]())
            self._in_flight[name] = task
            task.add_done_callback(_retrieve_exception)
        done, _ = await asyncio.wait({task}, timeout=CHECK_TIMEOUT_S)
        if not done:
            ok, reason = False, f"no answer within {CHECK_TIMEOUT_S:g} s"
        else:
            ok, reason = _answer(task)
        if self._last.get(name, True) != ok:
            if ok:
                logger.info("readiness: %s ready again", name)
            else:
                logger.warning("readiness: %s not ready (%s)", name, reason)
        self._last[name] = ok
        return ok


def _answer(task: asyncio.Task[bool]) -> tuple[bool, str]:
    """A finished check's answer, and why not when it is no."""
    try:
        ok = bool(task.result())
    except UnavailableError as exc:  # says why itself
        return False, str(exc)[:200]
    except asyncio.CancelledError:
        return False, "the check was cancelled"
    except Exception as exc:
        return False, f"{type(exc).__name__}: {str(exc)[:200]}"
    return ok, "" if ok else "the check said no"


def _retrieve_exception(task: asyncio.Task[bool]) -> None:
    # A check that failed after its probe stopped waiting: its answer is read by
    # the next probe, or not at all; either way asyncio need not log it.
    if not task.cancelled():
        task.exception()


class Readiness(BaseModel):
    """The body of ``/readyz`` (documentation only), 200 or 503 alike."""

    status: str = Field(description="`ready`, `not_ready` or `stopping`")
    checks: dict[str, bool] = Field(description="each dependency: reachable or not")
    details: dict[str, Any] | None = Field(
        default=None, description="a worker's state, queue and model"
    )


_READINESS_RESPONSES: dict[int | str, dict[str, Any]] = {
    503: {
        "model": Readiness,
        "description": "not ready: a dependency is unreachable, or the service is stopping",
    }
}


def health_router(
    checks: Mapping[str, Check],
    details: Callable[[], Mapping[str, Any]] | None = None,
    stopping: Callable[[], bool] | None = None,
) -> APIRouter:
    """``stopping``: whether the service still answers but takes no new work (it
    drains); ``/readyz`` then says so with a 503 at once, so that a load balancer
    sends the work elsewhere, whatever the dependencies."""
    router = APIRouter(tags=["health"])

    @router.get("/healthz")
    async def healthz() -> dict[str, str]:
        return {"status": "ok"}

    readiness = ReadinessChecks(checks)

    @router.get("/readyz", response_model=Readiness, responses=_READINESS_RESPONSES)
    async def readyz() -> JSONResponse:
        if stopping is not None and stopping():
            return JSONResponse(status_code=503, content={"status": "stopping", "checks": {}})
        results = await readiness.run()
        ready = all(results.values())
        body: dict[str, Any] = {"status": "ready" if ready else "not_ready", "checks": results}
        if details is not None:
            body["details"] = dict(details())
        return JSONResponse(status_code=200 if ready else 503, content=body)

    answer_head_too(router)
    return router
