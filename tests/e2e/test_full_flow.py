"""The whole marketplace flow (SPEC §2), as a marketplace sees it.

1. Separate processes on the real RabbitMQ, Redis, Postgres and S3 server:
   migrate, App API, both sub-service APIs, both workers.
2. The same flow on ``audiocraft-service dev``, with no infrastructure.

Each: ``POST /v1/call`` with both kinds → a signed webhook at a local receiver
(signature checked by an independent implementation) → ``GET /v1/result`` with
two downloadable WAVs of the right duration and sample rate → stats counting the
task once, by kind.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import io
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import soundfile

from tests.support.infra import RealInfra, free_port
from tests.support.processes import ServiceProcess, service_processes
from tests.support.receiver import Received, Receiver, run_receiver

pytestmark = pytest.mark.integration

MARKETPLACE_TOKEN = "marketplace-e2e-token"
WEBHOOK_SECRET = "e2e-webhook-secret"
EXPECTED = {"sound": 16_000, "music": 32_000}


def verify_standard_webhook(request: Received, secret: str) -> dict[str, Any]:
    """Standard Webhooks verification, written from the spec, not from our code."""
    webhook_id = request.headers["webhook-id"]
    timestamp = request.headers["webhook-timestamp"]
    key = (
        base64.b64decode(secret.removeprefix("whsec_"))
        if secret.startswith("whsec_")
        else secret.encode()
    )
    signed = f"{webhook_id}.{timestamp}.".encode() + request.body
    expected = base64.b64encode(hmac.new(key, signed, hashlib.sha256).digest()).decode()
    signatures = request.headers["webhook-signature"].split()
    assert f"v1,{expected}" in signatures, (signatures, expected)
    body: dict[str, Any] = request.json()
    return body


def check_flow(base_url: str, receiver: Receiver, user_id: str) -> None:
    auth = {"Authorization": f"Bearer {MARKETPLACE_TOKEN}"}
    call = httpx.post(
        f"{base_url}/v1/call",
        headers=auth,
        json={
            "user_id": user_id,
            "prompt": "rain on a tin roof with soft piano",
            "kinds": ["sound", "music"],
            "duration": 2,
            "callback_url": f"{receiver.url}/webhook",
        },
        timeout=10,
    )
    assert call.status_code == 202, call.text
    task_id = call.json()["task_id"]
    assert call.json()["status"] == "queued"

    received = receiver.wait_for(lambda got: len(got) >= 1, timeout_s=90)
    webhook = verify_standard_webhook(received[0], WEBHOOK_SECRET)
    assert webhook["task_id"] == task_id
    assert webhook["status"] == "succeeded", webhook

    result = httpx.get(f"{base_url}/v1/result/{task_id}", headers=auth, timeout=10)
    assert result.status_code == 200, result.text
    body = result.json()
    assert body["status"] == "succeeded"
    assert body["progress"] == 1.0
    assert body["user_id"] == user_id
    assert sorted(o["kind"] for o in body["outputs"]) == ["music", "sound"]
    for output in body["outputs"]:
        audio = httpx.get(output["url"], timeout=10)
        assert audio.status_code == 200
        samples, sample_rate = soundfile.read(io.BytesIO(audio.content))
        assert sample_rate == EXPECTED[output["kind"]] == output["sample_rate"]
        assert len(samples) == 2 * sample_rate
        assert output["bytes"] == len(audio.content)
        assert output["generation"]["backend"] == "synth"
        assert isinstance(output["generation"]["seed"], int)

    stats = httpx.get(f"{base_url}/v1/stats/{user_id}", headers=auth, timeout=10)
    assert stats.status_code == 200, stats.text
    counters = stats.json()
    assert counters["total"] == 1 and counters["succeeded"] == 1 and counters["failed"] == 0
    assert counters["by_kind"]["sound"]["total"] == 1
    assert counters["by_kind"]["music"]["total"] == 1
    assert counters["audio_seconds"] == pytest.approx(4.0)
    # Nothing more arrives: one webhook per task.
    assert len(receiver.snapshot()) == 1


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    with run_receiver() as receiver:
        yield receiver


def test_full_flow_on_the_real_stack(real_infra: RealInfra, receiver: Receiver) -> None:
    ports = {
        name: free_port() for name in ("app", "audio", "music", "audio_worker", "music_worker")
    }
    env = {
        **real_infra.env(),
        "MARKETPLACE_TOKEN": f"old-token,{MARKETPLACE_TOKEN}",
        "INTERNAL_TOKEN": "internal-e2e",
        "WEBHOOK_SECRET": WEBHOOK_SECRET,
        "ALLOW_PRIVATE_CALLBACKS": "true",
        "APP_API_PORT": str(ports["app"]),
        "APP_API_URL": f"http://127.0.0.1:{ports['app']}",
        "AUDIO_GEN_PORT": str(ports["audio"]),
        "MUSIC_GEN_PORT": str(ports["music"]),
        "AUDIO_GEN_API_URL": f"http://127.0.0.1:{ports['audio']}",
        "MUSIC_GEN_API_URL": f"http://127.0.0.1:{ports['music']}",
        "AUDIO_GEN_WORKER_PORT": str(ports["audio_worker"]),
        "MUSIC_GEN_WORKER_PORT": str(ports["music_worker"]),
    }
    migrate = subprocess.run(
        [sys.executable, "-m", "core_base.cli", "migrate"],
        env={**os.environ, **env},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert migrate.returncode == 0, migrate.stdout + migrate.stderr
    with service_processes() as processes:
        for name, args, port in [
            ("audio-api", ["audio-gen", "api"], ports["audio"]),
            ("music-api", ["music-gen", "api"], ports["music"]),
            ("audio-worker", ["audio-gen", "worker"], ports["audio_worker"]),
            ("music-worker", ["music-gen", "worker"], ports["music_worker"]),
            ("app-api", ["app-api"], ports["app"]),
        ]:
            process = ServiceProcess(name, args, env)
            processes.append(process)
            process.wait_http(f"http://127.0.0.1:{port}/healthz")
        base_url = f"http://127.0.0.1:{ports['app']}"
        processes[-1].wait_http(f"{base_url}/readyz")

        check_flow(base_url, receiver, user_id="e2e-user")


def test_full_flow_on_dev_with_no_infrastructure(tmp_path: Path, receiver: Receiver) -> None:
    ports = {
        name: free_port() for name in ("app", "audio", "music", "audio_worker", "music_worker")
    }
    env = {
        # Nothing points at real services: dev forces the embedded adapters.
        "MARKETPLACE_TOKEN": MARKETPLACE_TOKEN,
        "WEBHOOK_SECRET": WEBHOOK_SECRET,
        "APP_API_PORT": str(ports["app"]),
        "AUDIO_GEN_PORT": str(ports["audio"]),
        "MUSIC_GEN_PORT": str(ports["music"]),
        "AUDIO_GEN_API_URL": f"http://127.0.0.1:{ports['audio']}",
        "MUSIC_GEN_API_URL": f"http://127.0.0.1:{ports['music']}",
        "AUDIO_GEN_WORKER_PORT": str(ports["audio_worker"]),
        "MUSIC_GEN_WORKER_PORT": str(ports["music_worker"]),
        "RABBITMQ_HOST": "unreachable.invalid",
        "REDIS_HOST": "unreachable.invalid",
        "POSTGRES_HOST": "unreachable.invalid",
    }
    with service_processes() as processes:
        dev = ServiceProcess("dev", ["dev", "--data-dir", str(tmp_path / "data")], env)
        processes.append(dev)
        base_url = f"http://127.0.0.1:{ports['app']}"
        dev.wait_http(f"{base_url}/readyz")
        assert MARKETPLACE_TOKEN in dev.log()  # the token is printed at start-up

        check_flow(base_url, receiver, user_id="dev-user")
    assert list((tmp_path / "data" / "files").rglob("*.wav"))
