"""``HttpClient`` against a real local HTTP server: bodies and headers both ways,
no redirects, and every failure as one ``HttpError``."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import pytest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import RedirectResponse, Response, StreamingResponse
from starlette.routing import Route

from core_base.http.client import HttpClient, HttpError
from tests.app_api.support import serve
from tests.support.infra import free_port

seen: list[tuple[str, dict[str, str], bytes]] = []


async def echo(request: Request) -> Response:
    body = await request.body()
    seen.append((request.method, dict(request.headers), body))
    return Response(b'{"echo":' + (body or b"null") + b"}", status_code=201)


async def slow(request: Request) -> Response:
    await asyncio.sleep(2)
    return Response(b"late")


async def moved(request: Request) -> Response:
    return RedirectResponse("/echo", status_code=302)


async def huge(request: Request) -> Response:
    return Response(b"x" * (5 * 1024 * 1024))


async def dribble(request: Request) -> Response:
    async def chunks() -> AsyncIterator[bytes]:
        yield b"first"
        await asyncio.sleep(2)
        yield b"late"

    return StreamingResponse(chunks(), status_code=202)


@pytest.fixture
async def server() -> AsyncIterator[str]:
    seen.clear()
    app = Starlette(
        routes=[
            Route("/echo", echo, methods=["GET", "POST"]),
            Route("/slow", slow),
            Route("/moved", moved, methods=["POST"]),
            Route("/huge", huge, methods=["GET", "POST"]),
            Route("/dribble", dribble, methods=["POST"]),
        ]
    )
    async with serve(app) as url:
        yield url


@pytest.fixture
async def client() -> AsyncIterator[HttpClient]:
    http = HttpClient(timeout_s=0.5)
    yield http
    await http.aclose()


async def test_a_post_carries_its_body_and_headers_and_returns_the_answer(
    server: str, client: HttpClient
) -> None:
    response = await client.post(
        f"{server}/echo",
        content=b'{"a":1}',
        headers={"Content-Type": "application/json", "Authorization": "Bearer t"},
    )
    assert (response.status_code, response.is_success) == (201, True)
    assert response.json() == {"echo": {"a": 1}}
    method, headers, body = seen[0]
    assert (method, body) == ("POST", b'{"a":1}')
    assert headers["content-type"] == "application/json"
    assert headers["authorization"] == "Bearer t"


async def test_requests_share_a_kept_alive_connection(server: str, client: HttpClient) -> None:
    for _ in range(3):
        assert (await client.get(f"{server}/echo")).status_code == 201
    assert [method for method, _, _ in seen] == ["GET"] * 3
    assert client._session is not None
    assert len(client._session.connector._conns) == 1  # type: ignore[union-attr]


async def test_an_explicit_host_header_is_sent_as_given(server: str, client: HttpClient) -> None:
    await client.post(f"{server}/echo", content=b"1", headers={"Host": "hooks.example.com:443"})
    assert seen[0][1]["host"] == "hooks.example.com:443"


async def test_redirects_are_not_followed(server: str, client: HttpClient) -> None:
    response = await client.post(f"{server}/moved", content=b"1")
    assert response.status_code == 302
    assert seen == []


@pytest.mark.parametrize("url", ["http://a..b.invalid/x", "http://user:secret@127.0.0.1:9/x"])
async def test_a_request_refused_before_sending_is_an_http_error(url: str) -> None:
    """A host the client cannot encode, credentials beside an Authorization header:
    the caller handles it as any request without an answer (it is not a crash)."""
    client = HttpClient(connect_retries=0)
    try:
        with pytest.raises(HttpError, match="not sent") as info:
            await client.post(url, content=b"1", headers={"Authorization": "Bearer t"})
        assert "secret" not in str(info.value)
    finally:
        await client.aclose()


async def test_a_refused_connection_is_an_http_error() -> None:
    client = HttpClient(connect_retries=1)
    try:
        with pytest.raises(HttpError, match="refused"):
            await client.post(f"http://127.0.0.1:{free_port()}/x", content=b"1")
    finally:
        await client.aclose()


async def test_a_slow_answer_times_out(server: str, client: HttpClient) -> None:
    with pytest.raises(HttpError, match="timed out"):
        await client.get(f"{server}/slow")


async def test_an_oversized_answer_is_refused(server: str, client: HttpClient) -> None:
    with pytest.raises(HttpError):
        await client.get(f"{server}/huge")


@pytest.mark.parametrize("path", ["/huge", "/dribble"])
async def test_status_only_takes_the_status_of_an_answer_whose_body_does_not_come(
    server: str, client: HttpClient, path: str
) -> None:
    with pytest.raises(HttpError):
        await client.post(f"{server}{path}", content=b"{}")
    response = await client.post(f"{server}{path}", content=b"{}", status_only=True)
    assert (response.status_code, response.content) == (200 if path == "/huge" else 202, b"")
    # Without a status line there is still no answer.
    with pytest.raises(HttpError, match="timed out"):
        await client.request("GET", f"{server}/slow", status_only=True)
    # And the client goes on working.
    assert (await client.post(f"{server}/echo", content=b"1", status_only=True)).json() == {
        "echo": 1
    }


async def test_status_only_takes_the_status_of_an_answer_cut_short(client: HttpClient) -> None:
    async def cut_short(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        writer.write(b"HTTP/1.1 200 OK\r\n")
        writer.write(b"Content-Length: 100\r\n\r\nonly this")
        await writer.drain()
        writer.close()

    server = await asyncio.start_server(cut_short, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        url = f"http://127.0.0.1:{port}/"
        with pytest.raises(HttpError):
            await client.get(url)
        response = await client.request("POST", url, content=b"{}", status_only=True)
        assert (response.status_code, response.content) == (200, b"")
    finally:
        server.close()
        await server.wait_closed()


async def test_the_client_works_again_after_close(server: str, client: HttpClient) -> None:
    await client.get(f"{server}/echo")
    await client.aclose()
    assert (await client.get(f"{server}/echo")).status_code == 201


async def test_a_refused_connection_is_retried_until_the_server_listens() -> None:
    """A restarting peer: nothing listens at the first attempt, something does by
    the retry."""
    port = free_port()
    requests: list[bytes] = []

    async def answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        requests.append(await reader.readuntil(b"\r\n\r\n"))
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
        await writer.drain()
        writer.close()

    servers: list[asyncio.Server] = []

    async def listen_later() -> None:
        await asyncio.sleep(0.03)  # after the first attempt, before the first retry
        servers.append(await asyncio.start_server(answer, "127.0.0.1", port))

    client = HttpClient(connect_retries=2)
    listening = asyncio.create_task(listen_later())
    try:
        response = await client.get(f"http://127.0.0.1:{port}/x")
        assert (response.status_code, response.content) == (200, b"ok")
        assert len(requests) == 1
    finally:
        await listening
        await client.aclose()
        for server in servers:
            server.close()
            await server.wait_closed()
