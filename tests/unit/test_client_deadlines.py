"""Slow and greedy clients: a request must arrive whole within the deadline, a
response's write may stall no longer than that, and a request head is bounded;
on a real uvicorn server built by ``make_server`` and a raw socket playing the
client."""

from __future__ import annotations

import asyncio
import socket
import time
from collections.abc import AsyncIterator

import pytest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from core_base.http.header_limit import MAX_HEAD_BYTES
from core_base.http.server import ManagedServer, make_server
from tests.support.infra import free_port

DEADLINE_S = 0.6
GONE_WITHIN_S = DEADLINE_S + 2.0  # generous: a loaded CI machine is slow to wake
SEEN: list[str] = []


async def echo(request: Request) -> Response:
    body = await request.body()
    SEEN.append(request.method)
    return Response(body, media_type="application/octet-stream")


async def slow(request: Request) -> Response:
    """An app that is behind: it starts reading the body after twice the deadline."""
    await asyncio.sleep(2 * DEADLINE_S)
    body = await request.body()
    return Response(str(len(body)), media_type="text/plain")


async def large(request: Request) -> Response:
    """A response far larger than the kernel's socket buffers (a few MiB)."""
    return Response(b"z" * int(request.query_params["bytes"]), media_type="text/plain")


@pytest.fixture
async def server() -> AsyncIterator[ManagedServer]:
    app = Starlette(
        routes=[
            Route("/echo", echo, methods=["GET", "POST"]),
            Route("/slow", slow, methods=["POST"]),
            Route("/large", large),
        ]
    )
    server = make_server(
        app,
        host="127.0.0.1",
        port=free_port(),
        port_setting="PORT",
        log_level="warning",
        client_deadline_s=DEADLINE_S,
    )
    task = asyncio.create_task(server.serve())
    while not server.started:
        assert not task.done(), task
        await asyncio.sleep(0.01)
    try:
        yield server
    finally:
        server.should_exit = True
        await task


@pytest.fixture
def port(server: ManagedServer) -> int:
    return server.config.port


async def closed_after_s(reader: asyncio.StreamReader) -> float:
    """Seconds until the server closes the connection (reading nothing)."""
    started = time.monotonic()
    data = await asyncio.wait_for(reader.read(), timeout=GONE_WITHIN_S + 5)
    assert data == b"", data
    return time.monotonic() - started


async def test_a_connection_that_sends_nothing_is_closed(port: int) -> None:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    assert await closed_after_s(reader) < GONE_WITHIN_S
    writer.close()


async def test_headers_sent_a_byte_at_a_time_are_cut_off(port: int) -> None:
    """Each byte comes well within the deadline; the request as a whole does not."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    started = time.monotonic()

    async def trickle() -> None:
        for byte in b"GET /echo HTTP/1.1\r\nHost: x\r\nX-Pad: " + b"a" * 1000:
            writer.write(bytes([byte]))
            await writer.drain()
            await asyncio.sleep(DEADLINE_S / 6)

    sender = asyncio.create_task(trickle())
    try:
        await closed_after_s(reader)
    finally:
        sender.cancel()
        await asyncio.gather(sender, return_exceptions=True)
        writer.close()
    assert time.monotonic() - started < GONE_WITHIN_S


async def test_a_body_that_stalls_is_cut_off_and_never_handled(port: int) -> None:
    SEEN.clear()
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(b"POST /echo HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\n" + b"x" * 30)
    await writer.drain()
    assert await closed_after_s(reader) < GONE_WITHIN_S
    writer.close()
    assert SEEN == []


async def test_requests_that_arrive_in_time_are_answered_and_the_connection_kept(
    port: int,
) -> None:
    """Two requests on one connection, the second sent in pieces and after a pause
    longer than the deadline in all: the deadline counts per request, from its
    first byte, not from the connection's opening."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    for body in (b"first", b"second"):
        head = f"POST /echo HTTP/1.1\r\nHost: x\r\nContent-Length: {len(body)}\r\n\r\n"
        for piece in (head.encode(), body):
            writer.write(piece)
            await writer.drain()
            await asyncio.sleep(DEADLINE_S / 4)
        status = await asyncio.wait_for(reader.readline(), timeout=5)
        assert status.startswith(b"HTTP/1.1 200"), status
        headers = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), timeout=5)
        assert f"content-length: {len(body)}".encode() in headers.lower()
        assert await asyncio.wait_for(reader.readexactly(len(body)), timeout=5) == body
        await asyncio.sleep(DEADLINE_S * 0.8)  # idle, within uvicorn's keep-alive
    writer.close()


async def read_response(reader: asyncio.StreamReader) -> tuple[bytes, bytes]:
    """The status line and body of one response (with Content-Length)."""
    status = await asyncio.wait_for(reader.readline(), timeout=10)
    headers = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), timeout=10)
    length = next(
        int(line.split(b":", 1)[1])
        for line in headers.lower().split(b"\r\n")
        if line.startswith(b"content-length:")
    )
    return status, await asyncio.wait_for(reader.readexactly(length), timeout=10)


async def test_a_bare_crlf_after_a_response_does_not_hold_the_connection(port: int) -> None:
    """A CRLF between requests starts no request, yet stops uvicorn's keep-alive
    timer (5 s, which a response alone sets again): the deadline must close it."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(b"GET /echo HTTP/1.1\r\nHost: x\r\n\r\n")
    status, _ = await read_response(reader)
    assert status.startswith(b"HTTP/1.1 200"), status
    writer.write(b"\r\n")
    await writer.drain()
    assert await closed_after_s(reader) < GONE_WITHIN_S
    writer.close()


async def test_a_large_body_the_app_reads_late_is_not_cut_off(port: int) -> None:
    """Sent at once, but more than uvicorn buffers (64 KiB): it stops reading until
    the app does. The app, not the client, is behind: the request must be answered."""
    body = b"y" * 200_000
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(b"POST /slow HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n" % len(body) + body)
    await writer.drain()
    status, answer = await read_response(reader)
    assert status.startswith(b"HTTP/1.1 200"), status
    assert answer == str(len(body)).encode()
    writer.close()


async def test_a_client_waiting_for_100_continue_is_not_cut_off(port: int) -> None:
    """With ``Expect: 100-continue`` the body follows the server's go-ahead, which
    uvicorn sends when the app first reads: here after twice the deadline."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(
        b"POST /slow HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\nExpect: 100-continue\r\n\r\n"
    )
    await writer.drain()
    go_ahead = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), timeout=10)
    assert go_ahead.startswith(b"HTTP/1.1 100"), go_ahead
    writer.write(b"12345")
    await writer.drain()
    status, answer = await read_response(reader)
    assert status.startswith(b"HTTP/1.1 200"), status
    assert answer == b"5"
    writer.close()


async def small_window_connection(port: int) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    """A client whose receive buffer is small, so that a response it does not read
    backs up into the server's buffers rather than its own."""
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.connect(("127.0.0.1", port))
    sock.setblocking(False)
    return await asyncio.open_connection(sock=sock)


@pytest.mark.parametrize(
    "ending",
    ["keep-alive", "keep-alive ending first", "Connection: close"],
)
async def test_a_client_that_does_not_read_its_response_is_cut_off(
    server: ManagedServer, ending: str
) -> None:
    """However the server means to end the connection after the response: closing
    it (uvicorn's keep-alive timeout, 5 s by default; at once for Connection:
    close) waits for the unsent bytes, which this client never takes."""
    if ending == "keep-alive ending first":
        server.config.timeout_keep_alive = 0  # read by each new connection
    close = "Connection: close\r\n" if ending == "Connection: close" else ""
    reader, writer = await small_window_connection(server.config.port)
    request = f"GET /large?bytes={32 << 20} HTTP/1.1\r\nHost: x\r\n{close}\r\n"
    writer.write(request.encode())
    await writer.drain()
    # The response has begun: the server holds the connection and its unsent bytes.
    status = await asyncio.wait_for(reader.readline(), timeout=10)
    assert status.startswith(b"HTTP/1.1 200"), status
    assert len(server.server_state.connections) == 1
    started = time.monotonic()
    while server.server_state.connections:
        assert time.monotonic() - started < GONE_WITHIN_S, "the connection is still held"
        await asyncio.sleep(0.05)
    writer.close()


async def test_a_slow_but_steady_reader_gets_all_of_a_large_response(port: int) -> None:
    """Each deadline it takes far less than the server's buffers hold, but it takes
    bytes: the write is slow, not stalled, and must not be cut off."""
    size = 4 << 20
    reader, writer = await small_window_connection(port)
    writer.write(b"GET /large?bytes=%d HTTP/1.1\r\nHost: x\r\n\r\n" % size)
    await writer.drain()
    await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), timeout=10)
    received = 0
    while received < size:
        chunk = await asyncio.wait_for(reader.read(64 << 10), timeout=10)
        assert chunk, f"the connection was closed after {received} of {size} bytes"
        received += len(chunk)
        await asyncio.sleep(DEADLINE_S / 8)
    assert received == size
    writer.close()


@pytest.mark.parametrize(
    ("header_bytes", "piece"),
    [
        (2 * MAX_HEAD_BYTES, 4 * 1024),  # many small headers
        (1024 * 1024, 1024 * 1024),  # one large header, in one write
        (4 * 1024 * 1024, 16 * 1024),  # far more than the limit: cut off on the way
    ],
)
async def test_a_head_over_the_limit_is_answered_431_and_its_connection_closed(
    port: int, header_bytes: int, piece: int
) -> None:
    """Refused before it is all in memory (the limit counts whole reads, so a
    head somewhat over it may pass: the bound is the point, not the byte)."""
    SEEN.clear()
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(b"GET /echo HTTP/1.1\r\nHost: x\r\n")
    refused = False
    try:
        for _ in range(header_bytes // piece):
            writer.write(b"X-A: " + b"a" * (piece - 7) + b"\r\n")
            await writer.drain()
    except ConnectionError:
        refused = True  # cut off before all of it was sent
    if not refused:
        writer.write(b"\r\n")
    status, body = await read_response(reader)
    assert status.startswith(b"HTTP/1.1 431"), status
    assert body == b"Request header fields too large"
    assert await asyncio.wait_for(reader.read(), timeout=5) == b""
    writer.close()
    assert SEEN == []


async def test_heads_under_the_limit_after_large_bodies_are_answered(port: int) -> None:
    """The count is per head: bodies, and many heads on one connection, add up to
    far more than the limit without a refusal."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    near_limit = b"X-Big: " + b"b" * (MAX_HEAD_BYTES - 1024) + b"\r\n"
    body = b"x" * (512 * 1024)
    for _ in range(3):
        writer.write(
            b"POST /echo HTTP/1.1\r\nHost: x\r\n"
            + near_limit
            + b"Content-Length: %d\r\n\r\n" % len(body)
            + body
        )
        await writer.drain()
        status, echoed = await read_response(reader)
        assert status.startswith(b"HTTP/1.1 200"), status
        assert echoed == body
    writer.close()


async def test_pipelined_requests_over_the_limit_together_are_answered(port: int) -> None:
    """Sent in one write: each head is small, all of them together are not."""
    count = 2 * MAX_HEAD_BYTES // 1024
    request = b"GET /echo HTTP/1.1\r\nHost: x\r\nX-Pad: " + b"p" * 1000 + b"\r\n\r\n"
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(request * count)
    await writer.drain()
    for _ in range(count):
        status, _ = await read_response(reader)
        assert status.startswith(b"HTTP/1.1 200"), status
    writer.close()


async def test_a_chunked_bodys_trailers_over_the_limit_close_the_connection(port: int) -> None:
    """Trailer fields after the last chunk are kept like headers: bounded alike
    (not answered: the request's own response may be under way)."""
    SEEN.clear()
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(b"POST /echo HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n")
    writer.write(b"5\r\nhello\r\n0\r\nX-T: " + b"t" * (1024 * 1024) + b"\r\n\r\n")
    try:
        await writer.drain()
        answer = await asyncio.wait_for(reader.read(), timeout=10)
    except ConnectionError:
        answer = b""  # closed with this client's bytes unread: reset, not ended
    assert answer == b""
    writer.close()
    assert SEEN == []


async def test_chunked_bodies_and_their_small_trailers_are_answered(port: int) -> None:
    """Many chunks, far more than the limit in all, and trailers: not refused."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    chunks = [b"c" * 1000 for _ in range(300)] + [b"d"]
    body = b"".join(b"%x\r\n%s\r\n" % (len(c), c) for c in chunks)
    writer.write(
        b"POST /echo HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n"
        + body
        + b"0\r\nX-Checksum: abc\r\n\r\n"
    )
    await writer.drain()
    status, echoed = await read_response(reader)
    assert status.startswith(b"HTTP/1.1 200"), status
    assert echoed == b"".join(chunks)
    writer.close()
