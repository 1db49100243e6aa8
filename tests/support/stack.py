"""The real stack as separate processes, for end-to-end tests and benchmarks:
``migrate``, then the sub-service APIs, workers and the App API."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import httpx

from tests.support.infra import RealInfra, free_port
from tests.support.processes import ServiceProcess
from tests.support.receiver import Received
from tests.support.webhooks import verify_standard_webhook as verify_signature
from tests.support.webhooks import webhook_key

MARKETPLACE_TOKEN = "marketplace-e2e-token"
WEBHOOK_SECRET = "e2e-webhook-secret"
INTERNAL_TOKEN = "internal-e2e"
# (process name, CLI args, port setting) of each component.
COMPONENTS = {
    "audio-api": (["audio-gen", "api"], "AUDIO_GEN_PORT"),
    "music-api": (["music-gen", "api"], "MUSIC_GEN_PORT"),
    "audio-worker": (["audio-gen", "worker"], "AUDIO_GEN_WORKER_PORT"),
    "music-worker": (["music-gen", "worker"], "MUSIC_GEN_WORKER_PORT"),
    "app-api": (["app-api"], "APP_API_PORT"),
}


@dataclass(frozen=True)
class StackPorts:
    values: Mapping[str, int]

    @classmethod
    def allocate(cls) -> StackPorts:
        return cls({port: free_port() for _, port in COMPONENTS.values()})

    def env(self) -> dict[str, str]:
        env = {name: str(port) for name, port in self.values.items()}
        env["APP_API_URL"] = f"http://127.0.0.1:{self.values['APP_API_PORT']}"
        env["AUDIO_GEN_API_URL"] = f"http://127.0.0.1:{self.values['AUDIO_GEN_PORT']}"
        env["MUSIC_GEN_API_URL"] = f"http://127.0.0.1:{self.values['MUSIC_GEN_PORT']}"
        return env

    @property
    def app_url(self) -> str:
        return f"http://127.0.0.1:{self.values['APP_API_PORT']}"


def stack_env(infra: RealInfra, ports: StackPorts, **extra: str) -> dict[str, str]:
    return {
        **infra.env(),
        **ports.env(),
        "MARKETPLACE_TOKEN": f"old-token,{MARKETPLACE_TOKEN}",
        "INTERNAL_TOKEN": INTERNAL_TOKEN,
        "WEBHOOK_SECRET": WEBHOOK_SECRET,
        "ALLOW_PRIVATE_CALLBACKS": "true",
        **extra,
    }


def run_migrate(env: Mapping[str, str]) -> None:
    done = subprocess.run(
        [sys.executable, "-m", "core_base.cli", "migrate"],
        env={**os.environ, **env},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stdout + done.stderr


def start_stack(
    processes: list[ServiceProcess],
    env: Mapping[str, str],
    ports: StackPorts,
    components: Iterable[str] = COMPONENTS,
    ready_timeout_s: float = 120.0,
) -> None:
    """Start ``components`` (App API last) and wait until each is ready."""
    run_migrate(env)
    for name in components:
        start_component(processes, name, env, ports, ready_timeout_s)


def start_component(
    processes: list[ServiceProcess],
    name: str,
    env: Mapping[str, str],
    ports: StackPorts,
    ready_timeout_s: float = 120.0,
) -> ServiceProcess:
    """Start one component (a key of ``COMPONENTS``) and wait until it is ready."""
    args, port_setting = COMPONENTS[name]
    process = ServiceProcess(name, args, env)
    processes.append(process)
    path = "/healthz" if name == "app-api" else "/readyz"
    process.wait_http(f"http://127.0.0.1:{ports.values[port_setting]}{path}", ready_timeout_s)
    return process


def call_until_accepted(client: httpx.Client, base_url: str, body: dict[str, object]) -> str:
    """POST /v1/call as a marketplace does: retry refusals (503) and transport
    errors, with the client's headers (the same ``Idempotency-Key`` each time)."""
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        try:
            response = client.post(f"{base_url}/v1/call", json=body, timeout=10)
        except httpx.HTTPError:
            time.sleep(0.2)
            continue
        if response.status_code == 202:
            task_id: str = response.json()["task_id"]
            return task_id
        assert response.status_code == 503, response.text  # never a 500
        time.sleep(0.2)
    raise AssertionError("a call was never accepted")


def verify_standard_webhook(request: Received, secret: str) -> dict[str, Any]:
    """The body of a webhook request, after checking its signature (independently)."""
    assert verify_signature(request.headers, request.body, webhook_key(secret)), request.headers
    body: dict[str, Any] = request.json()
    return body
