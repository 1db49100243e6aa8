"""Helpers for the App API tests: real local HTTP servers (a fake sub-service API
and a webhook receiver), an app harness, an independent Standard Webhooks
verifier, and polling with a deadline."""

from __future__ import annotations

import asyncio
import base64
import json
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import AsyncExitStack, asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

import httpx
from fastapi import FastAPI, Request, Response
from fastapi.responses import JSONResponse
from starlette.types import ASGIApp

from app_api.app import create_app
from app_api.options import AppOptions
from core_base.adapters.storage_files import FileStorage
from core_base.contracts import AudioOutput, TaskResult
from core_base.domain import AudioFormat, Kind, TaskStatus
from core_base.http.server import make_server
from core_base.ports.database import Database
from core_base.ports.kv import KeyValueStore
from core_base.ports.storage import ObjectStorage
from core_base.settings import AppSettings
from tests.support.infra import free_port
from tests.support.webhooks import verify_standard_webhook as verify_standard_webhook

MARKETPLACE_TOKEN = "mk-token-1"
ROTATED_TOKEN = "mk-token-2"
INTERNAL_TOKEN = "internal-token-xyz"
WEBHOOK_KEY = b"test webhook key bytes"
WEBHOOK_SECRET = "whsec_" + base64.b64encode(WEBHOOK_KEY).decode()

AUTH = {"Authorization": f"Bearer {MARKETPLACE_TOKEN}"}
INTERNAL_AUTH = {"Authorization": f"Bearer {INTERNAL_TOKEN}"}

FAST = AppOptions(
    fanout_backoff_base_s=0.02,
    fanout_backoff_cap_s=0.1,
    fanout_deadline_s=1.5,
    reconcile_interval_s=0.1,
    reconcile_stale_after_s=3600.0,
    workflow_hard_deadline_s=3600.0,
    webhook_backoff_base_s=0.05,
    webhook_backoff_cap_s=0.2,
    webhook_max_age_s=60.0,
    webhook_lease_s=5.0,
    poll_interval_s=0.05,
    metrics_refresh_s=0.05,
    stop_grace_s=0.5,
)


async def eventually(
    check: Callable[[], Awaitable[Any]], *, timeout_s: float = 10.0, what: str = "condition"
) -> Any:
    """Poll ``check`` until it returns something truthy; fail after ``timeout_s``."""
    deadline = time.monotonic() + timeout_s
    while True:
        value = await check()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.02)


@asynccontextmanager
async def serve(app: ASGIApp) -> AsyncIterator[str]:
    """Run ``app`` on a free local port with uvicorn; yields its base URL."""
    port = free_port()
    server = make_server(app, host="127.0.0.1", port=port, port_setting="port", log_level="warning")
    task = asyncio.create_task(server.serve())

    async def started() -> bool:
        if task.done():
            task.result()
        return bool(server.started)

    await eventually(started, what="server start")
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        await task


@dataclass
class FakeSubService:
    """A sub-service API: records generate requests (one by one or in batches) and
    answers each task with ``status`` (per task in a batch). ``batch_status``
    answers a whole batch request instead; ``batch_route=False`` plays an older
    sub-service without ``/v1/generate/batch``."""

    status: int = 202
    batch_status: int | None = None
    batch_route: bool = True
    requests: list[dict[str, Any]] = field(default_factory=list)
    batches: list[int] = field(default_factory=list)
    auth: list[str] = field(default_factory=list)
    tasks: dict[str, TaskResult] = field(default_factory=dict)
    # Lookups of these answer 503 (the sub-service that holds them is down).
    unavailable_tasks: set[str] = field(default_factory=set)
    # Task ids looked up (GET /v1/tasks/{id}), in order.
    lookups: list[str] = field(default_factory=list)
    # Readiness pings (GET /v1/ping) answered; without the route, 404.
    pings: int = 0
    ping_route: bool = True
    # Task ids asked to be canceled (POST /v1/tasks/{id}/cancel), in order.
    canceled: list[str] = field(default_factory=list)
    # Answer every /v1 request 401, as a sub-service with another INTERNAL_TOKEN does.
    refuse_token: bool = False
    attempts_refused: int = 0
    # While set and not yet set off, batch requests are held unanswered (a hung API).
    hold: asyncio.Event | None = None

    def app(self) -> FastAPI:
        app = FastAPI()

        @app.middleware("http")
        async def token_check(request: Request, call_next: Any) -> Response:
            if self.refuse_token and request.url.path.startswith("/v1/"):
                if request.method == "POST" and "generate" in request.url.path:
                    self.attempts_refused += 1
                return JSONResponse({"message": "invalid token"}, status_code=401)
            response: Response = await call_next(request)
            return response

        @app.post("/v1/generate")
        async def generate(request: Request) -> Response:
            self.requests.append(await request.json())
            self.auth.append(request.headers.get("authorization", ""))
            if self.status == 202:
                return JSONResponse({"task_id": "x", "status": "queued"}, status_code=202)
            return JSONResponse({"message": "nope"}, status_code=self.status)

        @app.post("/v1/generate/batch")
        async def generate_batch(request: Request) -> Response:
            if not self.batch_route:
                return JSONResponse({"message": "not found"}, status_code=404)
            tasks = (await request.json())["tasks"]
            self.requests.extend(tasks)
            self.batches.append(len(tasks))
            self.auth.append(request.headers.get("authorization", ""))
            if self.hold is not None:
                await self.hold.wait()
            if self.batch_status is not None:
                return JSONResponse({"message": "batch refused"}, status_code=self.batch_status)
            if self.status == 202:
                results = [{"task_id": t["task_id"], "status": "queued"} for t in tasks]
            else:
                results = [
                    {"task_id": t["task_id"], "http_status": self.status, "message": "nope"}
                    for t in tasks
                ]
            return JSONResponse({"results": results})

        @app.get("/v1/ping")
        async def ping() -> Response:
            if not self.ping_route:  # a sub-service of an older release
                return JSONResponse({"message": "not found"}, status_code=404)
            self.pings += 1
            return Response(status_code=204)

        @app.get("/v1/tasks/{task_id}")
        async def task(task_id: str) -> Response:
            self.lookups.append(task_id)
            if task_id in self.unavailable_tasks:
                return JSONResponse({"message": "down"}, status_code=503)
            result = self.tasks.get(task_id)
            if result is None:
                return JSONResponse({"message": "unknown"}, status_code=404)
            return Response(result.to_bytes(), media_type="application/json")

        @app.post("/v1/tasks/{task_id}/cancel")
        async def cancel(task_id: str) -> Response:
            self.canceled.append(task_id)
            return JSONResponse({"task_id": task_id, "status": "canceled"})

        @app.get("/healthz")
        async def healthz() -> dict[str, str]:
            return {"status": "ok"}

        return app


@dataclass
class Receiver:
    """A webhook receiver answering ``statuses`` in turn (then the last one forever)."""

    statuses: list[int] = field(default_factory=lambda: [204])
    answer: bytes = b""  # the body of every answer
    received: list[tuple[dict[str, str], bytes]] = field(default_factory=list)

    def app(self) -> FastAPI:
        app = FastAPI()

        @app.post("/hook")
        async def hook(request: Request) -> Response:
            self.received.append((dict(request.headers), await request.body()))
            index = min(len(self.received), len(self.statuses)) - 1
            return Response(self.answer, status_code=self.statuses[index])

        return app

    def successes(self) -> int:
        count = 0
        for i in range(len(self.received)):
            if 200 <= self.statuses[min(i, len(self.statuses) - 1)] < 300:
                count += 1
        return count


# What the ``subservice`` and ``receiver`` fixtures yield: the fake and its URL.
Fake = tuple[FakeSubService, str]
Hook = tuple[Receiver, str]


def app_settings(**overrides: Any) -> AppSettings:
    values: dict[str, Any] = {
        "_env_file": None,
        "marketplace_token": f"{MARKETPLACE_TOKEN}, {ROTATED_TOKEN}",
        "internal_token": INTERNAL_TOKEN,
        "webhook_secret": WEBHOOK_SECRET,
        "app_api_url": "http://app.test",
        "audio_gen_api_url": "http://127.0.0.1:9",
        "music_gen_api_url": "http://127.0.0.1:9",
        "allow_private_callbacks": True,
    }
    values.update(overrides)
    return AppSettings(**values)


class ConnectCountingStorage(FileStorage):
    """File storage that counts :meth:`connect` calls (a service connects its
    storage while it starts, so that no task pays for building its clients)."""

    connects = 0

    async def connect(self) -> None:
        self.connects += 1
        await super().connect()


@dataclass
class Harness:
    app: FastAPI
    client: httpx.AsyncClient
    db: Database
    kv: KeyValueStore
    storage: ObjectStorage

    async def call(
        self, body: dict[str, Any], headers: dict[str, str] | None = None
    ) -> httpx.Response:
        return await self.client.post("/v1/call", json=body, headers={**AUTH, **(headers or {})})

    async def callback(self, result: TaskResult) -> httpx.Response:
        return await self.client.post(
            "/internal/v1/callback",
            content=result.to_bytes(),
            headers={**INTERNAL_AUTH, "Content-Type": "application/json"},
        )

    async def result(self, task_id: str) -> dict[str, Any]:
        response = await self.client.get(f"/v1/result/{task_id}", headers=AUTH)
        assert response.status_code == 200, response.text
        body: dict[str, Any] = response.json()
        return body

    async def rows(self, query: str, *args: Any) -> list[dict[str, Any]]:
        return await self.db.fetch(query, *args)


@asynccontextmanager
async def running_app(
    settings: AppSettings,
    *,
    db: Database,
    kv: KeyValueStore,
    storage: ObjectStorage,
    options: AppOptions = FAST,
) -> AsyncIterator[Harness]:
    """An App API with its lifespan running, reached in-process."""
    app = create_app(settings, db=db, kv=kv, storage=storage, options=options)
    async with AsyncExitStack() as stack:
        await stack.enter_async_context(app.router.lifespan_context(app))
        client = await stack.enter_async_context(
            httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://app.test")
        )
        yield Harness(app, client, db, kv, storage)


async def put_audio(
    storage: ObjectStorage, task_id: str, kind: Kind, data: bytes = b"RIFFdata"
) -> AudioOutput:
    key = f"audio/{task_id}/{kind.value}.wav"
    await storage.put(key, data, content_type="audio/wav")
    return AudioOutput(
        key=key,
        format=AudioFormat.WAV,
        duration=2.5,
        sample_rate=16000,
        channels=1,
        bytes=len(data),
    )


def succeeded(task_id: str, kind: Kind, output: AudioOutput) -> TaskResult:
    return TaskResult(
        task_id=task_id, kind=kind, status=TaskStatus.SUCCEEDED, progress=1.0, output=output
    )


def webhook_payload(body: bytes) -> dict[str, Any]:
    data: dict[str, Any] = json.loads(body)
    return data
