"""SPEC §6: a service process killed outright mid-flow loses nothing.

The full stack runs as processes on the real services. While calls stream in,
the AudioGen worker, the AudioGen API and the App API are each killed with
SIGKILL (no shutdown code runs: what an OOM kill or a lost node does) and
started again. Every call answered 202 must still end ``succeeded``, with one
webhook (a delivery the App API had not recorded before it died may be sent
again, with the same ``webhook-id``, as Standard Webhooks allows), one stored
result and one count in the stats.
"""

from __future__ import annotations

import signal
import time
from collections.abc import Callable, Iterator
from typing import Any

import httpx
import pytest

from tests.support.infra import RealInfra
from tests.support.processes import ServiceProcess, service_processes
from tests.support.receiver import Receiver, run_receiver
from tests.support.stack import (
    INTERNAL_TOKEN,
    MARKETPLACE_TOKEN,
    WEBHOOK_SECRET,
    StackPorts,
    call_until_accepted,
    stack_env,
    start_component,
    start_stack,
    verify_standard_webhook,
)

pytestmark = pytest.mark.integration
CALLS = 30
# Call index -> the component killed just before that call is made.
KILLS = {8: "audio-worker", 16: "audio-api", 24: "app-api"}
USER = "crash-user"


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    with run_receiver() as receiver:
        yield receiver


def kill_and_restart(
    processes: list[ServiceProcess], name: str, start: Callable[[str], ServiceProcess]
) -> None:
    victim = next(p for p in reversed(processes) if p.name == name)
    victim.signal(signal.SIGKILL)
    assert victim.wait_exit() == -signal.SIGKILL
    start(name)


def sub_service_task(ports: StackPorts, task_id: str) -> dict[str, Any]:
    """The AudioGen API's record of a task (its internal route)."""
    answer = httpx.get(
        f"http://127.0.0.1:{ports.values['AUDIO_GEN_PORT']}/v1/tasks/{task_id}",
        headers={"Authorization": f"Bearer {INTERNAL_TOKEN}"},
        timeout=10,
    )
    assert answer.status_code == 200, answer.text
    record: dict[str, Any] = answer.json()
    return record


def wait_until_generating(ports: StackPorts, task_id: str) -> None:
    deadline = time.monotonic() + 30
    while sub_service_task(ports, task_id)["status"] != "running":
        assert time.monotonic() < deadline, sub_service_task(ports, task_id)
        time.sleep(0.01)


def test_processes_killed_mid_flow_lose_nothing(real_infra: RealInfra, receiver: Receiver) -> None:
    ports = StackPorts.allocate()
    # Generations of ~0.25 s, so that each kill finds tasks queued, generating
    # and waiting for their callbacks or webhooks.
    env = stack_env(real_infra, ports, SYNTH_STEP_DELAY_MS="5")
    with service_processes() as processes:
        start_stack(processes, env, ports)
        accepted: list[str] = []
        with httpx.Client(headers={"Authorization": f"Bearer {MARKETPLACE_TOKEN}"}) as client:
            for index in range(CALLS):
                if KILLS.get(index) == "audio-worker":
                    # Mid-generation, so that the task must be run again.
                    interrupted = accepted[-1]
                    wait_until_generating(ports, interrupted)
                if index in KILLS:
                    kill_and_restart(
                        processes,
                        KILLS[index],
                        lambda name: start_component(processes, name, env, ports),
                    )
                body = {
                    "user_id": USER,
                    "prompt": f"glass breaking in a hall, take {index}",
                    "kinds": ["sound", "music"] if index % 3 == 0 else ["sound"],
                    "duration": 1,
                    "callback_url": f"{receiver.url}/webhook",
                }
                client.headers["Idempotency-Key"] = f"crash-{index}"
                accepted.append(call_until_accepted(client, ports.app_url, body))
                time.sleep(0.05)

        assert len(set(accepted)) == CALLS
        # Up to a lease (a fan-out's 30 s, a webhook's 60 s) can pass before a
        # restarted App API takes over what its predecessor had claimed.
        got = receiver.wait_for(
            lambda requests: {r.json()["task_id"] for r in requests} >= set(accepted),
            timeout_s=240,
        )
        webhook_ids: dict[str, set[str]] = {}
        for request in got:
            webhook = verify_standard_webhook(request, WEBHOOK_SECRET)
            assert webhook["status"] == "succeeded", webhook
            webhook_ids.setdefault(webhook["task_id"], set()).add(request.headers["webhook-id"])
        assert sorted(webhook_ids) == sorted(accepted)
        assert all(len(ids) == 1 for ids in webhook_ids.values()), webhook_ids
        assert sub_service_task(ports, interrupted)["attempts"] == 2

        auth = {"Authorization": f"Bearer {MARKETPLACE_TOKEN}"}
        for task_id in accepted:
            result = httpx.get(f"{ports.app_url}/v1/result/{task_id}", headers=auth, timeout=10)
            assert result.status_code == 200, result.text
            assert result.json()["status"] == "succeeded"
        stats = httpx.get(f"{ports.app_url}/v1/stats/{USER}", headers=auth, timeout=10).json()
        assert (stats["total"], stats["succeeded"], stats["failed"]) == (CALLS, CALLS, 0)
        with_music = sum(1 for index in range(CALLS) if index % 3 == 0)
        assert stats["by_kind"]["music"]["total"] == with_music
        assert stats["by_kind"]["sound"]["total"] == CALLS
