"""A TCP relay between a client under test and a real server, which a test can
cut (every connection dropped, as by a network failure or a server restart),
stop and start again on the same port, or freeze (connections stay open and
nothing flows either way, as with a hung server or a network partition that
drops packets instead of refusing them)."""

from __future__ import annotations

import asyncio
from urllib.parse import urlsplit, urlunsplit


class TcpProxy:
    def __init__(self, target_url: str, *, default_port: int) -> None:
        parts = urlsplit(target_url)
        self._target = (parts.hostname or "127.0.0.1", parts.port or default_port)
        self._url = parts
        self._server: asyncio.Server | None = None
        self._links: list[asyncio.StreamWriter] = []
        # Bytes towards the server, and towards the client (the answers).
        self._flowing = asyncio.Event()
        self._flowing.set()
        self._answering = asyncio.Event()
        self._answering.set()
        self.port = 0
        self.connections_accepted = 0
        self._refusing_new = False
        # A side that closes is passed on as a close (FIN) instead of a reset (RST).
        self.close_gracefully = False

    @property
    def url(self) -> str:
        """``target_url`` with this relay's address in place of the server's."""
        credentials = self._url.username or ""
        if self._url.password is not None:
            credentials += f":{self._url.password}"
        netloc = f"{credentials}@127.0.0.1:{self.port}" if credentials else f"127.0.0.1:{self.port}"
        return urlunsplit(self._url._replace(netloc=netloc))

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._link, "127.0.0.1", self.port)
        self.port = self._server.sockets[0].getsockname()[1]

    async def _link(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections_accepted += 1
        if self._refusing_new:
            writer.transport.abort()
            return
        upstream_reader, upstream_writer = await asyncio.open_connection(*self._target)
        self._links += [writer, upstream_writer]
        await asyncio.gather(
            self._pipe(reader, upstream_writer, self._flowing),
            self._pipe(upstream_reader, writer, self._answering),
            return_exceptions=True,
        )

    async def _pipe(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, flowing: asyncio.Event
    ) -> None:
        try:
            while data := await reader.read(65536):
                await flowing.wait()
                writer.write(data)
                await writer.drain()
        finally:
            if self.close_gracefully:
                writer.close()
            else:
                writer.transport.abort()

    def cut(self) -> None:
        """Drop every open connection, as a network failure would."""
        links, self._links = self._links, []
        for writer in links:
            writer.transport.abort()

    def freeze(self, *, answers_only: bool = False) -> None:
        """Hold every byte from now on, new connections' too, until :meth:`thaw`.
        ``answers_only``: requests still reach the server, which does the work,
        but its answers are held (a reply lost on the way back, a server that
        stalls after doing the work)."""
        if not answers_only:
            self._flowing.clear()
        self._answering.clear()

    def refuse_new(self, refusing: bool = True) -> None:
        """Drop new connections at once (the open ones go on relaying): e.g. the
        separate connection a PostgreSQL client cancels a query on is lost."""
        self._refusing_new = refusing

    def thaw(self) -> None:
        """Relay again, what was held first."""
        self._flowing.set()
        self._answering.set()

    async def stop(self) -> None:
        """Refuse new connections and drop the open ones."""
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
            self._server = None
        self.thaw()
        self.cut()
