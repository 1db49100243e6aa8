"""A deadline for reading each request: uvicorn has none.

uvicorn times out a connection only while it is idle between requests
(keep-alive). A client that connects and sends nothing, or sends a request's
headers or body a byte at a time ("slowloris"), holds its connection, and a
task, for as long as it likes: enough of them exhaust the process's file
descriptors. Here each request must arrive whole (headers and body) within a
deadline counted from its first byte, or from the connection's opening for the
first request; a request that misses it has its connection closed. The
application then sees the client gone (``http.disconnect``), as for any client
that drops mid-body. Time in which the server, not the client, holds the
request up (reading paused for a pipelined request or a large body the app has
not read yet; a client waiting for ``100 Continue``) does not count against it.
"""

from __future__ import annotations

import asyncio
import logging
from functools import cache

from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

logger = logging.getLogger(__name__)

# Long enough for any real client to send a request of the largest size a service
# takes (a few MiB) on a slow link; short enough that a slow sender's hold ends.
REQUEST_READ_DEADLINE_S = 30.0


class ReadDeadlineProtocol(HttpToolsProtocol):
    """uvicorn's httptools protocol, closing a connection whose request does not
    arrive whole within :attr:`read_deadline_s`."""

    read_deadline_s = REQUEST_READ_DEADLINE_S

    _read_due: asyncio.TimerHandle | None = None
    # The server held the request when the deadline last came (see _read_overdue).
    _was_held = False

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._arm()

    def data_received(self, data: bytes) -> None:
        super().data_received(data)
        # Bytes between requests that start none (a bare CRLF: the parser skips it)
        # cancel uvicorn's keep-alive timer, which only a response sets again: the
        # deadline takes over, or one CRLF would hold the connection forever.
        if (
            self._read_due is None
            and self.timeout_keep_alive_task is None
            and (self.cycle is None or self.cycle.response_complete)
            and not self.transport.is_closing()
        ):
            self._arm()

    def on_message_begin(self) -> None:
        super().on_message_begin()
        self._arm()

    def on_message_complete(self) -> None:
        self._disarm()
        super().on_message_complete()

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        super().connection_lost(exc)

    def _arm(self) -> None:
        if self._read_due is None:
            self._read_due = self.loop.call_later(self.read_deadline_s, self._read_overdue)

    def _disarm(self) -> None:
        self._was_held = False
        if self._read_due is not None:
            self._read_due.cancel()
            self._read_due = None

    def _read_overdue(self) -> None:
        self._read_due = None
        if self.transport.is_closing():
            return
        # Not the client's delay while the server holds the request, nor in the
        # window in which it let go (it may have done so a moment ago): the client
        # gets a whole deadline after the server is done holding it.
        held, self._was_held = self._was_held, self._server_holds_the_request()
        if held or self._was_held:
            self._arm()
            return
        # Debug: a flood of slow senders must not flood the log as well.
        logger.debug(
            "closed the connection of %s: its request did not arrive within %.0f s",
            "{}:{}".format(*self.client) if self.client else "a client",
            self.read_deadline_s,
        )
        self.transport.close()

    def _server_holds_the_request(self) -> bool:
        """Whether the rest of the request waits for the server, not the client:
        uvicorn has paused reading (a pipelined request queued behind the one
        being answered, or a large body the app has not started reading), or the
        client waits for the ``100 Continue`` the app's first read sends."""
        cycle = self.cycle
        waits_for_continue = (
            cycle is not None and cycle.waiting_for_100_continue and not cycle.response_complete
        )
        return bool(self.flow.read_paused or waits_for_continue)


@cache
def read_deadline_protocol(deadline_s: float) -> type[ReadDeadlineProtocol]:
    """The protocol class with a deadline of ``deadline_s`` (uvicorn takes a class)."""
    if deadline_s == REQUEST_READ_DEADLINE_S:
        return ReadDeadlineProtocol
    return type(
        "ReadDeadlineProtocol",
        (ReadDeadlineProtocol,),
        {"read_deadline_s": deadline_s, "__module__": __name__},
    )
