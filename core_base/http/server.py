"""Running ASGI apps and background components under one signal handler.

uvicorn installs its own signal handlers per server, which breaks when several
servers share a process (``dev``) or live beside a worker. ``ManagedServer``
turns that off; :func:`run_until_signalled` owns SIGTERM/SIGINT for everything.
uvicorn also ends the process (``sys.exit``) when it cannot start; here a port
in use is a :class:`SettingsError` naming its variable, and any other exit waits
until every component has stopped.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import gc
import logging
import os
import re
import signal
import socket
from collections.abc import Callable, Coroutine, Generator, Sequence
from typing import Any, NoReturn

import uvicorn
from starlette.types import ASGIApp

from core_base.errors import ComponentFailed, SettingsError, UnavailableError
from core_base.http.deadlines import CLIENT_DEADLINE_S, deadline_protocol

logger = logging.getLogger(__name__)


class ManagedServer(uvicorn.Server):
    """A uvicorn server that leaves signals to its owner and takes its port up front.

    ``port_setting`` names the variable the port comes from, for the one line a
    port in use stops start-up with.
    """

    def __init__(self, config: uvicorn.Config, *, port_setting: str) -> None:
        super().__init__(config)
        self.port_setting = port_setting
        self._socket: socket.socket | None = None

    @contextlib.contextmanager
    def capture_signals(self) -> Generator[None, None, None]:
        yield

    def bind(self) -> None:
        """Take the address now, before anything else starts; idempotent.

        Raises :class:`SettingsError` naming ``port_setting`` when the port cannot
        be had (uvicorn would log the error and exit the process from a task).
        """
        if self._socket is not None:
            return
        host, port = self.config.host, self.config.port
        sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET)
        # As uvicorn does: a restarted process can listen again at once (TIME_WAIT).
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError as exc:
            sock.close()
            raise SettingsError(f"{self.port_setting}: {_bind_failure(host, port, exc)}") from None
        self._socket = sock

    async def serve(self, sockets: list[socket.socket] | None = None) -> None:
        if sockets is None:
            self.bind()
            assert self._socket is not None
            sockets = [self._socket]
        try:
            await super().serve(sockets)
        finally:
            # The listener closes its socket; one never served (start-up failed)
            # must not keep the port.
            if self._socket is not None:
                self._socket.close()
                self._socket = None

    async def startup(self, sockets: list[socket.socket] | None = None) -> None:
        await super().startup(sockets)
        if self.started:  # uvicorn says so only for addresses it bound itself
            logger.info(
                "listening on %s:%d (%s)", self.config.host, self.config.port, self.port_setting
            )

    async def stop(self) -> None:
        self.should_exit = True


def _bind_failure(host: str, port: int, exc: OSError) -> str:
    if exc.errno == errno.EADDRINUSE:
        return f"port {port} is already in use on {host} (another process listens there)"
    return f"cannot listen on {host}:{port} ({exc.strerror or exc})"


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


# How long the tasks still there once a service's main coroutine has returned get
# to end after being cancelled. A client library's background task may ignore the
# cancellation (aio-pika's reconnect loop does, for a connection nobody closed):
# the process must exit all the same, not wait for SIGKILL.
LEFTOVER_TASKS_TIMEOUT_S = 5.0


def run_service(
    main: Coroutine[Any, Any, None], *, leftover_timeout_s: float = LEFTOVER_TASKS_TIMEOUT_S
) -> None:
    """``asyncio.run`` on uvloop where it is installed (it comes with
    ``uvicorn[standard]``), except that the tasks left over at the end get
    ``leftover_timeout_s`` to end: ``asyncio.run`` waits for them forever.
    Measured on the App API: the default loop's socket writes alone took an
    eighth of the process's CPU under load."""
    loop = _new_event_loop()
    asyncio.set_event_loop(loop)
    try:
        loop.run_until_complete(main)
    finally:
        try:
            _cancel_leftovers(loop, leftover_timeout_s)
            loop.run_until_complete(loop.shutdown_asyncgens())
            with contextlib.suppress(TimeoutError):
                loop.run_until_complete(
                    asyncio.wait_for(loop.shutdown_default_executor(), leftover_timeout_s)
                )
        finally:
            asyncio.set_event_loop(None)
            loop.close()


def _new_event_loop() -> asyncio.AbstractEventLoop:
    try:
        import uvloop
    except ImportError:
        return asyncio.new_event_loop()
    return uvloop.new_event_loop()


def _cancel_leftovers(loop: asyncio.AbstractEventLoop, timeout_s: float) -> None:
    leftovers = asyncio.all_tasks(loop)
    if not leftovers:
        return
    for task in leftovers:
        task.cancel()
    done, stuck = loop.run_until_complete(asyncio.wait(leftovers, timeout=timeout_s))
    for task in done:
        if not task.cancelled() and task.exception() is not None:
            loop.call_exception_handler(
                {
                    "message": "unhandled exception while shutting down",
                    "exception": task.exception(),
                    "task": task,
                }
            )
    for task in stuck:
        logger.warning(
            "exiting without %r: still running %.0f s after its cancellation", task, timeout_s
        )


# How long a stopping server waits for requests in flight: connections left open by
# clients must not hold a draining process forever. An orchestrator's grace period
# (compose's stop_grace_period) must be longer, or it kills the process first.
GRACEFUL_SHUTDOWN_S = 30


def make_server(
    app: ASGIApp,
    *,
    host: str,
    port: int,
    port_setting: str,
    log_level: str = "info",
    access_log: bool = False,
    client_deadline_s: float = CLIENT_DEADLINE_S,
) -> ManagedServer:
    """A server for ``app``; ``port_setting`` names the variable ``port`` comes from.
    ``access_log``: a line per request (``ACCESS_LOG``), through the root logger,
    at INFO (shown as ``LOG_LEVEL`` allows), also beside quiet servers in the same
    process. A request that does not arrive whole within ``client_deadline_s`` of
    its first byte, or a response whose write stalls that long, has its connection
    closed (see :mod:`core_base.http.deadlines`); a request head over 64 KiB is
    answered 431 (:mod:`core_base.http.header_limit`)."""
    access = logging.getLogger("uvicorn.access")
    # uvicorn's access logger is the process's, and every Config resets it: to its
    # server's log level, and cut off from the root logger when that server logs no
    # requests. Once a server of the process logs them (dev runs several), the
    # logger stays on; each server's protocol decides whether it logs.
    requests_logged = access_log or any(isinstance(f, RedactSignatures) for f in access.filters)
    config = uvicorn.Config(
        app,
        host=host,
        port=port,
        http=deadline_protocol(client_deadline_s),
        log_level=log_level.lower(),
        lifespan="on",
        timeout_graceful_shutdown=GRACEFUL_SHUTDOWN_S,
        # uvicorn's lines go through the root logger, in the services' one format
        # (its own config would print them as "INFO:     ...").
        log_config=None,
        access_log=access_log,
        # Nothing here uses the client address or scheme (signed URLs come from
        # settings), and rewriting them from X-Forwarded-* cost 2 % of the App API's CPU.
        proxy_headers=False,
    )
    if requests_logged:
        access.propagate = True
        # The root logger's level (LOG_LEVEL), not the log_level of whichever server
        # was made last (dev's are all at warning, to keep uvicorn's start-up quiet).
        access.setLevel(logging.NOTSET)
        if not any(isinstance(f, RedactSignatures) for f in access.filters):
            access.addFilter(RedactSignatures())
    return ManagedServer(config, port_setting=port_setting)


class RedactSignatures(logging.Filter):
    """Keeps signed links' signatures (``/files/...?signature=``, file storage)
    out of the access log: a logged link would work for anyone until it expires.
    Likewise a secret a client put in a query (``?token=``: the services read
    none there, but it was sent in clear all the same)."""

    _SECRET_PARAMETER = re.compile(
        r"((?:signature|token|access_token|api_key|apikey|key|secret|password)=)[^&\s]*",
        re.IGNORECASE,
    )

    def filter(self, record: logging.LogRecord) -> bool:
        if isinstance(record.args, tuple):
            record.args = tuple(
                self._SECRET_PARAMETER.sub(r"\1…", arg) if isinstance(arg, str) else arg
                for arg in record.args
            )
        return True


class _ComponentExit(Exception):
    """A component's ``SystemExit``, carried as an ordinary failure (see :func:`_contained`)."""

    def __init__(self, exit_: SystemExit) -> None:
        super().__init__(f"exit {exit_.code}")
        self.exit = exit_


async def _contained(component: Callable[[], Coroutine[Any, Any, None]]) -> None:
    try:
        await component()
    except SystemExit as exc:
        # Raised in a task, SystemExit leaves the event loop at once (uvicorn exits so
        # when its app fails to start): the other components would never be stopped
        # nor the adapters closed. It ends this component like any failure instead,
        # and is raised again once everything is down.
        raise _ComponentExit(exc) from None


def _exit_now(signum: int) -> NoReturn:
    """The second SIGTERM/SIGINT: whoever sends it (Ctrl-C again) wants out now,
    not after the drain. The work in hand is left as a crash leaves it (a worker's
    unacked messages go back to the queue; dev hands unfinished tasks out again at
    its next start). SIGINT's default would raise KeyboardInterrupt through the
    event loop, tracebacks and all, and the exit would still wait for a model's
    thread to finish its generation."""
    logger.warning(
        "received %s again: exiting now, without waiting for the work in hand",
        signal.Signals(signum).name,
    )
    logging.shutdown()
    os._exit(128 + signum)


async def run_until_signalled(
    start: Sequence[Callable[[], Coroutine[Any, Any, None]]],
    stop: Callable[[], Coroutine[Any, Any, None]],
    watchers: Sequence[Callable[[], Coroutine[Any, Any, None]]] = (),
) -> None:
    """Run the ``start`` coroutines; on SIGTERM/SIGINT call ``stop`` (which must make
    them return) and wait for them. A second signal exits at once (see
    :func:`_exit_now`).

    ``watchers`` run beside them and never end on their own unless something is
    wrong: one that ends (with an error) shuts the process down like a signal,
    and all are cancelled once the components have returned. A component that
    exits (``SystemExit``) stops the others first; its exit is raised last.
    """
    settle_heap()
    loop = asyncio.get_running_loop()
    stopping = asyncio.Event()

    def on_signal(signum: int) -> None:
        if stopping.is_set():
            _exit_now(signum)
        logger.info(
            "received %s: shutting down (a second one exits at once)", signal.Signals(signum).name
        )
        stopping.set()

    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, on_signal, sig)

    tasks = [asyncio.create_task(_contained(runner)) for runner in start]
    watching = [asyncio.create_task(watcher()) for watcher in watchers]
    stop_wait = asyncio.create_task(stopping.wait())
    done, _ = await asyncio.wait(
        [*tasks, *watching, stop_wait], return_when=asyncio.FIRST_COMPLETED
    )
    logged: list[BaseException] = []
    if stop_wait not in done:
        # A component or watcher ended on its own (crash or finished): stop the rest.
        for task in done:
            failure = task.exception()
            # A setting or a dependency at start-up: the console script says it
            # in one line; an exit was logged by whoever exits; anything else
            # deserves its traceback.
            if failure is not None and not isinstance(
                failure, SettingsError | UnavailableError | _ComponentExit
            ):
                logger.error("component failed", exc_info=failure)
                logged.append(failure)
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
        if isinstance(failures[0], _ComponentExit):
            raise failures[0].exit
        if any(failures[0] is failure for failure in logged):
            raise ComponentFailed() from failures[0]  # its traceback is in the log
        raise failures[0]
