"""Building and running the generation service's processes (API, worker)."""

from __future__ import annotations

import asyncio
import logging
import socket

from fastapi import FastAPI

from core_base.adapters.factory import create_broker, create_kv, create_storage
from core_base.errors import UnavailableError
from core_base.generation.api import create_generation_app
from core_base.generation.spec import ServiceSpec
from core_base.generation.worker import Worker
from core_base.http.errors import install_error_handlers
from core_base.http.health import health_router
from core_base.http.metrics import metrics_router
from core_base.http.server import make_server, run_service, run_until_signalled
from core_base.ports.broker import Broker
from core_base.settings import GenerationSettings

logger = logging.getLogger(__name__)

# How often a process checks that its broker adapter has not given up.
BROKER_WATCH_INTERVAL_S = 5.0


async def watch_broker(broker: Broker, interval_s: float = BROKER_WATCH_INTERVAL_S) -> None:
    """Ends (with an error) once the broker adapter has given up reconnecting: a
    process that can no longer reach RabbitMQ must exit and be restarted, not sit
    there answering /healthz."""
    while not broker.gave_up:  # noqa: ASYNC110 - adapters expose a flag, not an event
        await asyncio.sleep(interval_s)
    raise UnavailableError("RabbitMQ stayed unreachable; exiting so the supervisor restarts us")


def create_worker_health_app(worker: Worker) -> FastAPI:
    """The worker's small HTTP port: ``/healthz`` answers as long as the event
    loop runs (also mid-generation); ``/readyz`` only once the model is warm."""
    app = FastAPI(
        title=f"{worker.spec.title} worker",
        version=worker.settings.api_version,
        redirect_slashes=False,
    )
    install_error_handlers(app)  # the services' error body, here too
    app.include_router(health_router(worker.readiness_checks(), worker.readiness_details))
    app.include_router(metrics_router(worker.metrics.registry))
    return app


def connection_name(spec: ServiceSpec, role: str) -> str:
    """``audio_gen worker on <host>``: the process's RabbitMQ connection, as its
    management UI lists it (replicas differ by host: a container's is its id)."""
    return f"{spec.name} {role} on {socket.gethostname()}"


def run_api(spec: ServiceSpec, settings: GenerationSettings, host: str) -> int:
    settings.require("internal_token")
    settings.warn_about_short_secrets("internal_token")

    async def main() -> None:
        broker, kv = create_broker(settings, name=connection_name(spec, "api")), create_kv(settings)
        # The broker is connected here, not by the app's lifespan: RabbitMQ down,
        # or refusing the login, stops start-up in one line instead of uvicorn's
        # "Application startup failed" traceback.
        app = create_generation_app(spec, settings, broker=broker, kv=kv, manage_broker=False)
        server = make_server(
            app,
            host=host,
            port=settings.port,
            port_setting=f"{spec.env_prefix}PORT",
            log_level=settings.log_level,
            access_log=settings.access_log,
        )
        try:
            server.bind()
            await broker.connect()
            # Declared here too (the app's lifespan does it again, idempotently): a
            # queue that exists with other settings stops start-up in one line.
            await broker.declare(spec.queue(settings))
            await run_until_signalled(
                [server.serve], server.stop, watchers=[lambda: watch_broker(broker)]
            )
        finally:
            await broker.close()
            await kv.close()

    run_service(main())
    return 0


def run_worker(spec: ServiceSpec, settings: GenerationSettings, host: str) -> int:
    settings.require("internal_token")
    settings.warn_about_short_secrets("internal_token")

    async def main() -> None:
        broker = create_broker(settings, name=connection_name(spec, "worker"))
        kv, storage = create_kv(settings), create_storage(settings)
        worker = Worker(spec, settings, broker=broker, kv=kv, storage=storage)
        health = make_server(
            create_worker_health_app(worker),
            host=host,
            port=settings.worker_port,
            port_setting=f"{spec.env_prefix}WORKER_PORT",
            log_level="warning",
        )

        async def stop() -> None:
            await worker.stop()
            # Keep answering probes until the worker has drained.
            await worker.wait_stopped()
            await health.stop()

        try:
            # Before anything connects or loads: a port in use is one line at once.
            health.bind()
            await run_until_signalled(
                [health.serve, worker.run], stop, watchers=[lambda: watch_broker(broker)]
            )
        finally:
            # The worker closes it when it stops; also when it never started.
            await broker.close()
            await kv.close()
            await storage.close()

    run_service(main())
    return 0
