"""A worker's health port: alive at once, ready only once the model is loaded and
warmed up (and with the model's facts in the details), metrics throughout."""

from __future__ import annotations

import asyncio
import logging
import threading
from pathlib import Path
from typing import Any

import httpx
import pytest

from core_base.adapters.broker_memory import MemoryBroker
from core_base.adapters.kv_memory import MemoryStore
from core_base.backends.synth import SynthAdapter
from core_base.generation.process import create_worker_health_app
from core_base.generation.worker import Worker
from core_base.settings import load_settings
from music_gen.service import SPEC
from tests.app_api.support import ConnectCountingStorage, serve
from tests.support.conformance import fuzz_against_schema
from tests.support.workers import embedded_worker


class GatedAdapter(SynthAdapter):
    """The synth backend, whose load blocks until the test opens the gate."""

    gate = threading.Event()

    def load(self, progress: Any = None) -> None:
        self.gate.wait(timeout=30)
        super().load(progress)


async def test_ready_only_after_the_model_is_loaded_and_warm(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    settings = load_settings(SPEC.settings_class, internal_token="t")
    adapter = GatedAdapter.from_settings(settings, SPEC)
    storage = ConnectCountingStorage(tmp_path, public_base_url="http://x", signing_secret="s")
    worker = Worker(
        SPEC, settings, broker=MemoryBroker(), kv=MemoryStore(), storage=storage, adapter=adapter
    )
    app = create_worker_health_app(worker)
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://worker") as client:
        running = asyncio.create_task(worker.run())
        try:
            assert (await client.get("/healthz")).status_code == 200
            with caplog.at_level(logging.WARNING, logger="core_base.http.health"):
                loading = await client.get("/readyz")
            assert loading.status_code == 503
            assert loading.json()["checks"]["model"] is False
            assert "model not ready (the worker is loading)" in caplog.text  # says why
            metrics = (await client.get("/metrics")).text
            assert "worker_ready 0.0" in metrics
            # Every outcome a series at 0 from the start (for rate() alerts).
            for outcome in ("succeeded", "failed", "retried", "unreadable"):
                series = f'generation_tasks_total{{outcome="{outcome}",service="{SPEC.name}"}} 0.0'
                assert series in metrics, series

            GatedAdapter.gate.set()
            for _ in range(500):
                if worker.ready:
                    break
                await asyncio.sleep(0.01)
            ready = await client.get("/readyz")
            assert ready.status_code == 200, ready.text
            details = ready.json()["details"]
            assert details["state"] == "ready"
            assert details["model"]["backend"] == "synth"
            assert storage.connects == 1  # the first upload builds no clients
            assert ready.json()["checks"]["storage"] is True
            storage.root.rename(storage.root.with_name("gone"))  # the store is down
            down = await client.get("/readyz")
            assert down.status_code == 503 and down.json()["checks"]["storage"] is False
            metrics = (await client.get("/metrics")).text
            assert "worker_ready 1.0" in metrics
            # The process's own, as on every /metrics.
            assert "process_resident_memory_bytes" in metrics and "python_info" in metrics
        finally:
            GatedAdapter.gate.set()
            await worker.stop()
            await asyncio.wait_for(running, timeout=10)
    assert worker.state == "stopped"


def synth_worker(tmp_path: Path) -> Worker:
    """A worker on embedded adapters, as the health port's tests serve it."""
    return embedded_worker(SPEC, tmp_path)


async def test_the_health_port_answers_as_documented(tmp_path: Path) -> None:
    """Once ready, as its OpenAPI schema says (while loading, /readyz's 503 is the
    point, and the test above checks it)."""
    worker = synth_worker(tmp_path)
    async with serve(create_worker_health_app(worker)) as url:
        running = asyncio.create_task(worker.run())
        try:
            for _ in range(500):
                if worker.ready:
                    break
                await asyncio.sleep(0.01)
            assert worker.ready
            report = await fuzz_against_schema(url, token="t", workdir=tmp_path)
        finally:
            await worker.stop()
            await running
    assert report.passed, report.output


async def test_the_health_port_answers_errors_in_the_services_shape(tmp_path: Path) -> None:
    worker = synth_worker(tmp_path)
    async with serve(create_worker_health_app(worker)) as url, httpx.AsyncClient() as client:
        for method, path, status in (("GET", "/nothing", 404), ("POST", "/healthz", 405)):
            response = await client.request(method, f"{url}{path}")
            assert response.status_code == status
            assert set(response.json()) >= {"error", "message"}, response.json()


async def test_head_answers_as_get_without_a_body(tmp_path: Path) -> None:
    """Load balancers and `curl -I` probe with HEAD: not a 405."""
    worker = synth_worker(tmp_path)
    async with serve(create_worker_health_app(worker)) as url, httpx.AsyncClient() as client:
        for path in ("/healthz", "/readyz", "/metrics"):
            head = await client.head(f"{url}{path}")
            get = await client.get(f"{url}{path}")
            assert (path, head.status_code) == (path, get.status_code)
            assert head.headers["content-type"] == get.headers["content-type"]
        # Not in the schema: a second operation under the GET's operationId.
        schema = (await client.get(f"{url}/openapi.json")).json()
        assert "head" not in schema["paths"]["/healthz"]
