"""Deadlines uvicorn lacks: for reading each request, and for a response's
write that makes no progress.

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

The other way round, a client that stops reading a response larger than the
socket's buffers (``/metrics``, a file served by ``/files``) leaves the app
waiting for the write to drain, for ever, holding the connection and its task
(and a draining process until its grace period ends). Here a write may stall (no
byte taken by the client) for at most the same deadline; then the connection is
aborted (closing would wait for the stuck buffer) and the app's next write
returns at once, as for any client gone.
"""

from __future__ import annotations

import asyncio
import logging
import socket
import sys
from functools import cache
from typing import Any

from uvicorn.config import Config
from uvicorn.server import ServerState

from core_base.http.header_limit import HeaderLimitProtocol

logger = logging.getLogger(__name__)

# Long enough for any real client to send a request of the largest size a service
# takes (a few MiB) on a slow link, and for one whose reading stalls a moment;
# short enough that a slow sender's, or a non-reader's, hold ends.
CLIENT_DEADLINE_S = 30.0
# struct tcp_info (linux/tcp.h): tcpi_bytes_acked, a u64 since Linux 4.1.
_BYTES_ACKED = slice(120, 128)
_TCP_INFO_SIZE = 256


class DeadlineProtocol(HeaderLimitProtocol):
    """uvicorn's httptools protocol, closing a connection whose request does not
    arrive whole within :attr:`deadline_s`, or whose response's write stalls that
    long; a request head is bounded too (:mod:`core_base.http.header_limit`). It
    logs requests only when its server was made with ``access_log``."""

    deadline_s = CLIENT_DEADLINE_S

    _read_due: asyncio.TimerHandle | None = None
    _write_due: asyncio.TimerHandle | None = None
    _write_mark = 0  # _progress_mark() when the write deadline was set
    # The server held the request when the deadline last came (see _read_overdue).
    _was_held = False

    def __init__(
        self,
        config: Config,
        server_state: ServerState,
        app_state: dict[str, Any],
        _loop: asyncio.AbstractEventLoop | None = None,
    ) -> None:
        super().__init__(config, server_state, app_state, _loop)
        # uvicorn asks only its process-wide access logger, which another server in
        # the process may keep on (dev): a quiet server's requests stay unlogged.
        self.access_log = self.access_log and config.access_log

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._watch_read()

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
            self._watch_read()

    def on_message_begin(self) -> None:
        super().on_message_begin()
        self._watch_read()

    def on_message_complete(self) -> None:
        self._stop_watching_read()
        super().on_message_complete()

    def connection_lost(self, exc: Exception | None) -> None:
        self._stop_watching_read()
        self._stop_watching_write()
        super().connection_lost(exc)

    def pause_writing(self) -> None:
        # The transport's buffer is over its high-water mark: the client has not
        # taken what the kernel's buffers hold either.
        super().pause_writing()
        self._watch_write()

    def resume_writing(self) -> None:
        super().resume_writing()
        # What is left below the low-water mark is not sent yet either: a client
        # that stops taking bytes now would hold it, and the connection, for ever
        # (uvicorn's close() after the response waits for it).
        if self.transport.get_write_buffer_size():
            self._watch_write()
        else:
            self._stop_watching_write()

    def _watch_write(self) -> None:
        """(Re)start the deadline for the client to take bytes of what is buffered."""
        self._stop_watching_write()
        self._write_mark = self._progress_mark()
        self._write_due = self.loop.call_later(self.deadline_s, self._write_overdue)

    def _stop_watching_write(self) -> None:
        if self._write_due is not None:
            self._write_due.cancel()
            self._write_due = None

    def _write_overdue(self) -> None:
        self._write_due = None
        # Closing counts too: uvicorn closes the connection after the response (keep-
        # alive timeout, Connection: close, shutdown), and close() waits for the
        # buffer. Nothing buffered here: the kernel has it, and this process holds
        # nothing for the client.
        if not self.transport.get_write_buffer_size():
            return
        # A slow reader of a large buffer may not bring it down to the low-water
        # mark within the deadline: what counts is that it takes bytes at all.
        if self._progress_mark() > self._write_mark:
            self._watch_write()
            return
        logger.debug(
            "aborted the connection of %s: it took no byte of its response for %.0f s",
            self._client_name(),
            self.deadline_s,
        )
        # Not close(): that waits to send the buffer this client does not take.
        self.transport.abort()

    def _progress_mark(self) -> int:
        """A number that grows whenever the client takes bytes: on Linux, the bytes
        it has acknowledged (TCP_INFO); elsewhere, less the transport's buffer,
        which moves only when the kernel frees half of its (megabytes of) send
        buffer, which a slow but steady reader may take longer than the deadline
        to do. Not what is left to send, which the app's later writes raise."""
        sock = self.transport.get_extra_info("socket")
        try:
            info = sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, _TCP_INFO_SIZE)
        except (AttributeError, OSError):
            info = b""
        if len(info) >= _BYTES_ACKED.stop:
            return int.from_bytes(info[_BYTES_ACKED], sys.byteorder)
        return -self.transport.get_write_buffer_size()

    def _client_name(self) -> str:
        return "{}:{}".format(*self.client) if self.client else "a client"

    def _watch_read(self) -> None:
        if self._read_due is None:
            self._read_due = self.loop.call_later(self.deadline_s, self._read_overdue)

    def _stop_watching_read(self) -> None:
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
            self._watch_read()
            return
        # Debug: a flood of slow senders must not flood the log as well.
        logger.debug(
            "closed the connection of %s: its request did not arrive within %.0f s",
            self._client_name(),
            self.deadline_s,
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
def deadline_protocol(deadline_s: float) -> type[DeadlineProtocol]:
    """The protocol class with a deadline of ``deadline_s`` (uvicorn takes a class)."""
    if deadline_s == CLIENT_DEADLINE_S:
        return DeadlineProtocol
    return type(
        "DeadlineProtocol",
        (DeadlineProtocol,),
        {"deadline_s": deadline_s, "__module__": __name__},
    )
