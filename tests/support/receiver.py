"""A real HTTP receiver for callbacks and webhooks, served by uvicorn in a thread.

It records every request and answers with scripted status codes (e.g. 500, 500,
500, then 204), so tests can check retries, signatures and deduplication.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from tests.support.infra import free_port, wait_for_port


@dataclass
class Received:
    path: str
    headers: dict[str, str]
    body: bytes

    def json(self) -> Any:
        return json.loads(self.body)


@dataclass
class Receiver:
    url: str
    requests: list[Received] = field(default_factory=list)
    statuses: list[int] = field(default_factory=list)  # consumed one per request; then 200
    answer: bytes = b""  # the body of every answer (JSON)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def snapshot(self) -> list[Received]:
        with self._lock:
            return list(self.requests)

    def wait_for(
        self, predicate: Callable[[list[Received]], bool], timeout_s: float = 30.0
    ) -> list[Received]:
        """Poll until ``predicate(requests)`` holds; fail with what arrived otherwise."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            got = self.snapshot()
            if predicate(got):
                return got
            time.sleep(0.02)
        raise AssertionError(
            f"receiver condition not met in {timeout_s}s; got {[r.body[:200] for r in self.snapshot()]}"
        )


@contextmanager
def run_receiver() -> Iterator[Receiver]:
    port = free_port()
    receiver = Receiver(url=f"http://127.0.0.1:{port}")

    async def record(request: Request) -> Response:
        body = await request.body()
        with receiver._lock:
            receiver.requests.append(
                Received(request.url.path, {k.lower(): v for k, v in request.headers.items()}, body)
            )
            status = receiver.statuses.pop(0) if receiver.statuses else 200
        media_type = "application/json" if receiver.answer else None
        return Response(receiver.answer, status_code=status, media_type=media_type)

    app = Starlette(routes=[Route("/{path:path}", record, methods=["POST", "PUT"])])
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    wait_for_port("127.0.0.1", port)
    try:
        yield receiver
    finally:
        server.should_exit = True
        thread.join(timeout=10)
