"""``ACCESS_LOG`` with several servers in one process (``dev``): uvicorn's access
logger is the process's, yet each server logs its requests as it was made to,
whichever was made last, and a signed link's signature is never logged."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager

import httpx
import pytest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from core_base.http.server import ManagedServer, make_server
from tests.support.infra import free_port


async def ok(request: Request) -> Response:
    return Response("ok", media_type="text/plain")


@pytest.fixture(autouse=True)
def access_logger() -> Iterator[None]:
    """The servers a test makes set uvicorn's logger up for the whole process:
    it is put back as it was for the next test."""
    access = logging.getLogger("uvicorn.access")
    level, propagate = access.level, access.propagate
    filters, handlers = list(access.filters), list(access.handlers)
    yield
    access.setLevel(level)
    access.propagate = propagate
    access.filters, access.handlers = filters, handlers


def server(*, access_log: bool) -> ManagedServer:
    # At warning, as dev makes all of its servers: the access log's lines are INFO.
    return make_server(
        Starlette(routes=[Route("/{path:path}", ok)]),
        host="127.0.0.1",
        port=free_port(),
        port_setting="PORT",
        log_level="warning",
        access_log=access_log,
    )


@asynccontextmanager
async def serving(*servers: ManagedServer) -> AsyncIterator[None]:
    tasks = [asyncio.create_task(s.serve()) for s in servers]
    try:
        while not all(s.started for s in servers):
            assert not any(t.done() for t in tasks), tasks
            await asyncio.sleep(0.01)
        yield
    finally:
        for s in servers:
            await s.stop()
        await asyncio.gather(*tasks)


async def get(server: ManagedServer, path: str) -> None:
    async with httpx.AsyncClient() as client:
        answer = await client.get(f"http://127.0.0.1:{server.config.port}{path}")
    assert answer.status_code == 200


def access_lines(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == "uvicorn.access"]


@pytest.mark.parametrize("quiet_made_first", [False, True], ids=["quiet last", "quiet first"])
async def test_each_server_logs_its_requests_as_it_was_made_to(
    caplog: pytest.LogCaptureFixture, quiet_made_first: bool
) -> None:
    caplog.set_level(logging.INFO)
    if quiet_made_first:
        quiet = server(access_log=False)
        logged = server(access_log=True)
    else:
        logged = server(access_log=True)
        # Made after: it must not switch the shared logger off for the other.
        quiet = server(access_log=False)

    async with serving(logged, quiet):
        await get(logged, "/files/a.wav?expires=1&signature=s3cr3t")
        await get(quiet, "/healthz")

    (line,) = access_lines(caplog)
    assert line.endswith(' - "GET /files/a.wav?expires=1&signature=… HTTP/1.1" 200'), line


async def test_a_secret_sent_in_a_query_is_not_logged(caplog: pytest.LogCaptureFixture) -> None:
    """The services read no token from a query, but a client may put one there."""
    caplog.set_level(logging.INFO)
    logged = server(access_log=True)
    async with serving(logged):
        await get(logged, "/healthz?token=t0p&api_key=k3y&Password=pw&page=2")

    # (Every line: in a whole test run another test's uvicorn handler may log it too.)
    lines = access_lines(caplog)
    assert lines
    for line in lines:
        assert "t0p" not in line and "k3y" not in line and "pw&" not in line, line
        assert "/healthz?token=…&api_key=…&Password=…&page=2 " in line, line


async def test_nothing_is_logged_by_default(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO)
    first, second = server(access_log=False), server(access_log=False)

    async with serving(first, second):
        await get(first, "/v1/call")
        await get(second, "/healthz")

    assert access_lines(caplog) == []
