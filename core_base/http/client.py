"""The services' outbound HTTP client: a pooled keep-alive client on aiohttp.

Every hop of a workflow goes through one: the App API's fan-out to the
sub-services, a worker's callback to the App API, the App API's webhook to the
client. Measured on loopback (2 cores, uvloop), a request with its answer costs
httpx about 0.6 ms and aiohttp about 0.2 ms, and three such hops lie between a
call and its webhook; so the client is aiohttp, behind this small interface
(status and body, one error type for "no answer") so that callers neither
depend on it nor handle its many exception classes.
"""

from __future__ import annotations

import asyncio
import json
import ssl
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import aiohttp

from core_base.constants import HTTP_TIMEOUT_S

# Refused connections (a restarting pod) are retried this often, after 0.1 s, then
# 0.2 s; anything longer is the caller's retry policy.
DEFAULT_CONNECT_RETRIES = 2
_CONNECT_RETRY_PAUSE_S = 0.1
_DEFAULT_CONNECT_TIMEOUT_S = 3.0
# Answers are small JSON documents or empty: a larger one is not read into memory.
_MAX_RESPONSE_BYTES = 4 * 1024 * 1024
# Idle connections are dropped before uvicorn's keep-alive timeout (5 s) closes them
# from the other side, so a request never goes out on a connection being closed.
_KEEPALIVE_S = 4.0


class HttpError(Exception):
    """No usable answer: refused, reset, timed out, or too large. ``str(exc)`` names
    the cause without the URL (which may carry a token or a client's address)."""


@dataclass(frozen=True)
class HttpResponse:
    status_code: int
    content: bytes

    @property
    def is_success(self) -> bool:
        return 200 <= self.status_code < 300

    def json(self) -> Any:
        """The body as JSON; raises ``ValueError`` when it is not JSON."""
        return json.loads(self.content)

    def reason_given(self) -> str:
        """The services' own reason for an error, as ``": <message>"`` (the
        ``message`` of their error body, cut at 200 characters); "" without one."""
        try:
            body = self.json()
        except ValueError:
            return ""
        message = body.get("message") if isinstance(body, dict) else None
        return f": {str(message)[:200]}" if message else ""


class HttpClient:
    """One connection pool. Create it anywhere; its aiohttp session is opened on
    the first request (aiohttp wants a running event loop) and closed by
    :meth:`aclose`. Never follows redirects, never reads proxy settings from the
    environment (a webhook's pinned address must be where the request goes): a
    ``proxy`` is given or there is none. ``ssl_context`` replaces the system's
    certificate store."""

    def __init__(
        self,
        *,
        timeout_s: float = HTTP_TIMEOUT_S,
        connect_timeout_s: float = _DEFAULT_CONNECT_TIMEOUT_S,
        connect_retries: int = DEFAULT_CONNECT_RETRIES,
        max_connections: int = 100,
        proxy: str | None = None,
        ssl_context: ssl.SSLContext | None = None,
    ) -> None:
        self._timeout = aiohttp.ClientTimeout(total=timeout_s, connect=connect_timeout_s)
        self._connect_retries = connect_retries
        self._max_connections = max_connections
        self._proxy = proxy
        self._ssl: ssl.SSLContext | bool = ssl_context if ssl_context is not None else True
        self._session: aiohttp.ClientSession | None = None

    async def post(
        self,
        url: str,
        *,
        content: bytes,
        headers: Mapping[str, str] | None = None,
        server_hostname: str | None = None,
        status_only: bool = False,
    ) -> HttpResponse:
        return await self.request(
            "POST",
            url,
            content=content,
            headers=headers,
            server_hostname=server_hostname,
            status_only=status_only,
        )

    async def get(self, url: str, *, headers: Mapping[str, str] | None = None) -> HttpResponse:
        return await self.request("GET", url, headers=headers)

    async def request(
        self,
        method: str,
        url: str,
        *,
        content: bytes | None = None,
        headers: Mapping[str, str] | None = None,
        server_hostname: str | None = None,
        status_only: bool = False,
    ) -> HttpResponse:
        """Send one request and read the whole answer. ``server_hostname`` is the
        TLS name (SNI and certificate check) when ``url`` names an address.
        ``status_only``: the status line is the answer; a body that does not arrive
        whole (too large, cut short, too slow) is left unread and ``content`` is
        empty, instead of an ``HttpError`` for a request the server has taken."""
        session = self._session_now()
        for attempt in range(self._connect_retries + 1):
            try:
                async with session.request(
                    method,
                    url,
                    data=content,
                    headers=headers,
                    allow_redirects=False,
                    server_hostname=server_hostname,
                    proxy=self._proxy,
                ) as response:
                    try:
                        body = await _read_limited(response)
                    except (aiohttp.ClientError, TimeoutError):
                        if not status_only:
                            raise
                        body = b""  # the connection is dropped with the rest of it
                    return HttpResponse(response.status, body)
            except aiohttp.ClientConnectorError as exc:
                # Nothing was sent: retrying cannot duplicate the request.
                if attempt == self._connect_retries:
                    raise HttpError(_cause(exc)) from exc
                await asyncio.sleep(_CONNECT_RETRY_PAUSE_S * 2**attempt)
            except (aiohttp.ClientError, TimeoutError) as exc:
                raise HttpError(_cause(exc)) from exc
            except ValueError as exc:
                # Refused before sending (a host IDNA cannot encode, credentials in
                # the URL beside an Authorization header): no answer will come.
                raise HttpError(f"request not sent: {type(exc).__name__}") from exc
        raise AssertionError("unreachable")  # the loop returns or raises

    async def aclose(self) -> None:
        session, self._session = self._session, None
        if session is not None:
            await session.close()

    def _session_now(self) -> aiohttp.ClientSession:
        if self._session is None or self._session.closed:
            connector = aiohttp.TCPConnector(
                limit=self._max_connections, keepalive_timeout=_KEEPALIVE_S, ssl=self._ssl
            )
            self._session = aiohttp.ClientSession(
                connector=connector,
                timeout=self._timeout,
                trust_env=False,
                # Our callers send their own Content-Type with each body.
                skip_auto_headers=("Content-Type",),
            )
        return self._session


async def _read_limited(response: aiohttp.ClientResponse) -> bytes:
    if response.content_length is not None and response.content_length > _MAX_RESPONSE_BYTES:
        raise aiohttp.ClientPayloadError(f"answer of {response.content_length} bytes")
    chunks: list[bytes] = []
    size = 0
    async for chunk in response.content.iter_any():
        size += len(chunk)
        if size > _MAX_RESPONSE_BYTES:
            raise aiohttp.ClientPayloadError("answer too large")
        chunks.append(chunk)
    return b"".join(chunks)


def _cause(exc: BaseException) -> str:
    if isinstance(exc, TimeoutError):
        return "timed out"
    if isinstance(exc, aiohttp.ClientConnectorCertificateError):
        return "TLS certificate not trusted"
    if isinstance(exc, aiohttp.ClientConnectorError):
        return "connection refused or unreachable"
    return type(exc).__name__
