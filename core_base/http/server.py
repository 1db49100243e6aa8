"""Running ASGI apps and background components under one signal handler.

uvicorn installs its own signal handlers per server, which breaks when several
servers share a process (``dev``) or live beside a worker. ``ManagedServer``
turns that off; :func:`run_until_signalled` owns SIGTERM/SIGINT for everything.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import signal
from collections.abc import Callable, Coroutine, Generator, Sequence
from typing import Any

import uvicorn
from starlette.types import ASGIApp

from core_base.errors import SettingsError, UnavailableError

logger = logging.getLogger(__name__)


class ManagedServer(uvicorn.Server):
    """A uvicorn server that leaves signals to its owner."""

    @contextlib.contextmanager
    def capture_signals(self) -> Generator[None, None, None]:
        yield

    async def stop(self) -> None:
        self.should_exit = True


# Allocations between young-generation collections (CPython's default: 700). A
# request allocates hundreds of objects, most dead by its end: collecting less
# often scans as many survivors for much less overhead.
_GC_YOUNG_THRESHOLD = 10_000


def settle_heap() -> None:
    """Call once the process is built (modules imported, apps created): what exists
    now lives as long as the process, so it is moved out of the cyclic collector's
    sight (``gc.freeze``) and full collections walk only what requests create.
    Measured on the App API under load: full collections of 90 ms, the whole of
    its p99, before; and 12 % of its CPU in the collector."""
    gc.collect()
    gc.freeze()
    _, older, oldest = gc.get_threshold()
    gc.set_threshold(_GC_YOUNG_THRESHOLD, older, oldest)


def run_service(main: Coroutine[Any, Any, None]) -> None:
    """``asyncio.run`` on uvloop where it is installed (it comes with
    ``uvicorn[standard]``). Measured on the App API: the default loop's socket
    writes alone took an eighth of the process's CPU under load."""
    try:
        import uvloop
    except ImportError:
        asyncio.run(main)
        return
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        runner.run(main)


# How long a stopping server waits for requests in flight: connections left open by
# clients must not hold a draining process forever. An orchestrator's grace period
# (compose's stop_grace_period) must be longer, or it kills the process first.
GRACEFUL_SHUTDOWN_S = 30


def make_server(app: ASGIApp, *, host: str, port: int, log_level: str = "info") -> ManagedServer:
    config = uvicorn.Config(
        app,
        host=host,
        port=port,
        log_level=log_level.lower(),
        lifespan="on",
        timeout_graceful_shutdown=GRACEFUL_SHUTDOWN_S,
        # uvicorn's lines go through the root logger, in the services' one format
        # (its own config would print them as "INFO:     ...").
        log_config=None,
        access_log=False,
        # Nothing here uses the client address or scheme (signed URLs come from
        # settings), and rewriting them from X-Forwarded-* cost 2 % of the App API's CPU.
        proxy_headers=False,
    )
    return ManagedServer(config)


async def run_until_signalled(
    start: Sequence[Callable[[], Coroutine[Any, Any, None]]],
    stop: Callable[[], Coroutine[Any, Any, None]],
    watchers: Sequence[Callable[[], Coroutine[Any, Any, None]]] = (),
) -> None:
    """Run the ``start`` coroutines; on SIGTERM/SIGINT call ``stop`` (which must make
    them return) and wait for them. A second signal is left to the default handler.

    ``watchers`` run beside them and never end on their own unless something is
    wrong: one that ends (with an error) shuts the process down like a signal,
    and all are cancelled once the components have returned.
    """
    settle_heap()
    loop = asyncio.get_running_loop()
    stopping = asyncio.Event()

    def on_signal(signum: int) -> None:
        logger.info("received %s: shutting down", signal.Signals(signum).name)
        stopping.set()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.remove_signal_handler(sig)

    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, on_signal, sig)

    tasks = [asyncio.create_task(runner()) for runner in start]
    watching = [asyncio.create_task(watcher()) for watcher in watchers]
    stop_wait = asyncio.create_task(stopping.wait())
    done, _ = await asyncio.wait(
        [*tasks, *watching, stop_wait], return_when=asyncio.FIRST_COMPLETED
    )
    if stop_wait not in done:
        # A component or watcher ended on its own (crash or finished): stop the rest.
        for task in done:
            failure = task.exception()
            # A setting or a dependency at start-up: the console script says it
            # in one line; anything else deserves its traceback.
            if failure is not None and not isinstance(failure, SettingsError | UnavailableError):
                logger.error("component failed", exc_info=failure)
    await stop()
    stop_wait.cancel()
    results = await asyncio.gather(*tasks, return_exceptions=True)
    for watcher_task in watching:
        watcher_task.cancel()
    results += await asyncio.gather(*watching, return_exceptions=True)
    failures = [
        r
        for r in results
        if isinstance(r, BaseException) and not isinstance(r, asyncio.CancelledError)
    ]
    if failures:
        raise failures[0]
