"""A bound uvicorn lacks on a request's head (request line and headers).

uvicorn's httptools protocol takes headers of any size: the parser keeps a
header's value until it ends, and uvicorn keeps every header until the head
ends. A client without a token could send hundreds of MiB of headers on each
of a few connections (memory grows by as much: an out-of-memory kill in a
container) or within the 30 s request deadline. Here a head over
:data:`MAX_HEAD_BYTES` is answered ``431 Request Header Fields Too Large`` and
its connection closed, as nginx and Node do at their own limits. What the client
sends meanwhile is read and dropped for a moment before the close ("lingering
close"): closing with its bytes unread would reset the connection, and the
client could lose the 431 before reading it.
"""

from __future__ import annotations

import logging

from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

logger = logging.getLogger(__name__)

# Far above any head a client of these services sends (a token, an
# Idempotency-Key, a signed link's query: a few KiB), as nginx's 4 x 8 KiB is.
MAX_HEAD_BYTES = 64 * 1024
_REFUSAL = b"Request header fields too large"
# How long a refused client's further bytes are read and dropped before the close.
LINGER_S = 2.0


class HeaderLimitProtocol(HttpToolsProtocol):
    """uvicorn's httptools protocol, refusing a request head (or a chunked body's
    trailer fields) over :attr:`max_head_bytes`.

    Counted in whole chunks as they arrive while a head is incomplete; a chunk in
    which the previous request ended is not counted (part of it was that
    request). So a head is cut off within ``max_head_bytes`` plus two reads (at
    most 256 KiB each): the bound is what matters, not the exact byte.
    """

    max_head_bytes = MAX_HEAD_BYTES

    _head_bytes = 0
    _reading_head = True  # the connection's first request's head comes first
    _request_ended_in_chunk = False
    _refused = False  # the 431 is sent: what comes now is dropped
    _in_trailers = False  # after a chunked body's last chunk: its trailer fields

    def data_received(self, data: bytes) -> None:
        if self._refused:
            return
        self._request_ended_in_chunk = False
        super().data_received(data)
        if not self._reading_head or self._request_ended_in_chunk:
            return
        self._head_bytes += len(data)
        if self._head_bytes > self.max_head_bytes and not self.transport.is_closing():
            self._refuse_head()

    def on_headers_complete(self) -> None:
        self._reading_head = False
        self._head_bytes = 0
        super().on_headers_complete()

    def on_chunk_header(self) -> None:
        # httptools calls this for each chunk of a chunked body, the last (empty)
        # one too: its trailer fields, kept like headers, are bounded like a head.
        # A chunk with data is body (on_body): not counted.
        self._reading_head = True
        self._head_bytes = 0
        self._request_ended_in_chunk = True  # the body's bytes came in this read
        self._in_trailers = True

    def on_body(self, body: bytes) -> None:
        self._reading_head = False
        self._in_trailers = False
        super().on_body(body)

    def on_message_complete(self) -> None:
        super().on_message_complete()
        self._reading_head = True
        self._request_ended_in_chunk = True
        self._in_trailers = False

    def _refuse_head(self) -> None:
        # Debug, as for the deadlines: a flood of such clients must not flood the log.
        logger.debug(
            "refused a request head over %d bytes from %s",
            self.max_head_bytes,
            "{}:{}".format(*self.client) if self.client else "a client",
        )
        if self._in_trailers or (self.cycle is not None and not self.cycle.response_complete):
            # Its own request's trailers, or a pipelined request behind one still
            # being answered: no room for another response on this connection.
            self.transport.close()
            return
        head = [b"HTTP/1.1 431 Request Header Fields Too Large\r\n"]
        for name, value in self.server_state.default_headers:
            head.append(name + b": " + value + b"\r\n")
        head.append(
            b"content-type: text/plain; charset=utf-8\r\ncontent-length: %d\r\n"
            b"connection: close\r\n\r\n" % len(_REFUSAL)
        )
        self.transport.write(b"".join(head) + _REFUSAL)
        self._refused = True
        self.transport.write_eof()
        self.loop.call_later(LINGER_S, self.transport.close)
