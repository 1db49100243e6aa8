"""SPEC §6: dependencies dropping every connection under load lose nothing.

The full stack runs as processes on the real services; while calls stream in,
RabbitMQ, Redis and PostgreSQL each drop all client connections (what a
restart looks like to the clients; the data itself survives, as it does on a
restart of these servers with their persistent storage). A call answered 202
must end with exactly one signed webhook saying ``succeeded``; a call refused
(503) is retried by the client, as a marketplace would.
"""

from __future__ import annotations

import subprocess
from collections.abc import Iterator

import httpx
import pytest

from tests.support.infra import POSTGRES_URL, REDIS_URL, RealInfra
from tests.support.processes import service_processes
from tests.support.receiver import Receiver, run_receiver
from tests.support.stack import (
    MARKETPLACE_TOKEN,
    WEBHOOK_SECRET,
    StackPorts,
    call_until_accepted,
    stack_env,
    start_stack,
    verify_standard_webhook,
)

pytestmark = pytest.mark.integration
CALLS = 24


def drop_rabbitmq_connections() -> None:
    subprocess.run(
        ["rabbitmqctl", "close_all_connections", "blip test"],
        check=True,
        capture_output=True,
        timeout=60,
    )


def drop_redis_connections() -> None:
    import redis

    client = redis.Redis.from_url(REDIS_URL)
    try:
        client.client_kill_filter(_type="normal", skipme=True)
    finally:
        client.close()


def drop_postgres_connections() -> None:
    import asyncio

    import asyncpg

    async def terminate() -> None:
        connection = await asyncpg.connect(POSTGRES_URL)
        try:
            await connection.execute(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity"
                " WHERE datname = current_database() AND pid <> pg_backend_pid()"
            )
        finally:
            await connection.close()

    asyncio.run(terminate())


BLIPS = {3: drop_rabbitmq_connections, 9: drop_redis_connections, 15: drop_postgres_connections}


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    with run_receiver() as receiver:
        yield receiver


def test_connection_drops_under_load_lose_nothing(
    real_infra: RealInfra, receiver: Receiver
) -> None:
    ports = StackPorts.allocate()
    with service_processes() as processes:
        start_stack(processes, stack_env(real_infra, ports), ports)
        accepted: list[str] = []
        headers = {"Authorization": f"Bearer {MARKETPLACE_TOKEN}", "Idempotency-Key": ""}
        with httpx.Client() as client:
            for index in range(CALLS):
                if index in BLIPS:
                    BLIPS[index]()
                body = {
                    "user_id": "blip-user",
                    "prompt": f"thunder and rain, take {index}",
                    "kinds": ["sound", "music"] if index % 2 else ["sound"],
                    "duration": 1,
                    "callback_url": f"{receiver.url}/webhook",
                }
                # The same key on every retry: a retried call must not become two.
                client.headers.update({**headers, "Idempotency-Key": f"blip-{index}"})
                accepted.append(call_until_accepted(client, ports.app_url, body))

        assert len(set(accepted)) == CALLS
        got = receiver.wait_for(lambda requests: len(requests) >= CALLS, timeout_s=180)
        webhooks = [verify_standard_webhook(request, WEBHOOK_SECRET) for request in got]
        by_task: dict[str, list[dict[str, object]]] = {}
        for webhook in webhooks:
            by_task.setdefault(str(webhook["task_id"]), []).append(webhook)
        assert sorted(by_task) == sorted(accepted)
        assert all(len(deliveries) == 1 for deliveries in by_task.values())
        assert {str(w["status"]) for w in webhooks} == {"succeeded"}, [
            (w["task_id"], w["error"]) for w in webhooks if w["status"] != "succeeded"
        ]
        # Expected outages, each process's own lines about them: no tracebacks, and
        # no errors from the client libraries (found by a dependency-failure probe).
        for process in processes:
            lines = process.log_path.read_text(errors="replace").splitlines()
            noisy = [
                # A traceback with the lines after it, so that a failure shows what raised.
                "\n".join(lines[max(0, index - 2) : index + 30])
                for index, line in enumerate(lines)
                if "Traceback" in line or (" ERROR " in line and " aio" in line)
            ]
            assert not noisy, f"{process.name}:\n" + "\n---\n".join(noisy[:3])
