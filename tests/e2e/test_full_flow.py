"""The whole marketplace flow (SPEC §2), as a marketplace sees it.

1. Separate processes on the real RabbitMQ, Redis, Postgres and S3 server:
   migrate, App API, both sub-service APIs, both workers.
2. The same flow on ``audiocraft-service dev``, with no infrastructure.

Each: ``POST /v1/call`` with both kinds → a signed webhook at a local receiver
(signature checked by an independent implementation) → ``GET /v1/result`` with
two downloadable WAVs of the right duration and sample rate → stats counting the
task once, by kind. And ``dev`` killed mid-task runs the task again when it is
started again on the same data directory; ``dev`` logs requests as
``ACCESS_LOG`` says.
"""

from __future__ import annotations

import io
import json
import signal
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import soundfile

from tests.support.infra import RealInfra
from tests.support.processes import ServiceProcess, service_processes
from tests.support.receiver import Receiver, run_receiver
from tests.support.stack import (
    INTERNAL_TOKEN,
    MARKETPLACE_TOKEN,
    WEBHOOK_SECRET,
    StackPorts,
    stack_env,
    start_stack,
    verify_standard_webhook,
)

pytestmark = pytest.mark.integration

EXPECTED = {"sound": 16_000, "music": 32_000}


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
    ports = StackPorts.allocate()
    with service_processes() as processes:
        # With the access log on: its lines must not carry secrets either.
        env = {**stack_env(real_infra, ports), "ACCESS_LOG": "true"}
        start_stack(processes, env, ports)

        check_flow(ports.app_url, receiver, user_id="e2e-user")

        app_api = next(process for process in processes if process.name == "app-api")
        assert '"POST /v1/call HTTP/1.1" 202' in app_api.log_path.read_text(errors="replace")
        # SPEC §6: secrets never appear in logs.
        for process in processes:
            log = process.log_path.read_text(errors="replace")
            for secret in (MARKETPLACE_TOKEN, "old-token", INTERNAL_TOKEN, WEBHOOK_SECRET):
                assert secret not in log, f"{secret!r} in the log of {process.name}"


def dev_env(ports: StackPorts, step_delay_ms: int) -> dict[str, str]:
    return {
        **ports.env(),
        # Nothing points at real services: dev forces the embedded adapters, and
        # the addresses of its components follow their ports.
        "MARKETPLACE_TOKEN": MARKETPLACE_TOKEN,
        "WEBHOOK_SECRET": WEBHOOK_SECRET,
        "RABBITMQ_HOST": "unreachable.invalid",
        "REDIS_HOST": "unreachable.invalid",
        "POSTGRES_HOST": "unreachable.invalid",
        "APP_API_URL": "http://unreachable.invalid:1",
        "AUDIO_GEN_API_URL": "http://unreachable.invalid:1",
        "MUSIC_GEN_API_URL": "http://unreachable.invalid:1",
        "SYNTH_STEP_DELAY_MS": str(step_delay_ms),
    }


def test_full_flow_on_dev_with_no_infrastructure(tmp_path: Path, receiver: Receiver) -> None:
    ports = StackPorts.allocate()
    # Slow enough that a 30 s task is still running when it is canceled.
    env = dev_env(ports, step_delay_ms=2)
    with service_processes() as processes:
        dev = ServiceProcess("dev", ["dev", "--data-dir", str(tmp_path / "data")], env)
        processes.append(dev)
        base_url = ports.app_url
        dev.wait_http(f"{base_url}/readyz")
        assert MARKETPLACE_TOKEN in dev.log()  # the token is printed at start-up

        check_flow(base_url, receiver, user_id="dev-user")
        check_cancel(base_url, ports, receiver)
    assert list((tmp_path / "data" / "files").rglob("*.wav"))


@pytest.mark.parametrize(
    ("access_log", "log_format"),
    [(True, "text"), (False, "text"), (True, "json")],
    ids=["ACCESS_LOG=true", "default", "ACCESS_LOG=true,LOG_FORMAT=json"],
)
def test_dev_logs_each_api_request_once_when_asked_for(
    tmp_path: Path, access_log: bool, log_format: str
) -> None:
    """Its five servers share uvicorn's access logger: the App API and both
    sub-service APIs log each request once (no signature), the workers' health
    ports never, and none by default. With LOG_FORMAT=json every log line is a
    JSON object, the access lines too."""
    ports = StackPorts.allocate()
    env = dev_env(ports, step_delay_ms=0)
    env["LOG_FORMAT"] = log_format
    if access_log:
        env["ACCESS_LOG"] = "true"
    internal = {"Authorization": "Bearer dev-internal-token"}
    with service_processes() as processes:
        dev = ServiceProcess("dev", ["dev", "--data-dir", str(tmp_path / "data")], env)
        processes.append(dev)
        dev.wait_http(f"{ports.app_url}/readyz")

        def get(port: str, path: str) -> int:
            url = f"http://127.0.0.1:{ports.values[port]}{path}"
            return httpx.get(url, headers=internal, timeout=10).status_code

        assert get("APP_API_PORT", "/files/sound.wav?expires=1&signature=s3cr3t") in (403, 404)
        assert get("AUDIO_GEN_PORT", "/v1/tasks/no-such-sound") == 404
        assert get("MUSIC_GEN_PORT", "/v1/tasks/no-such-music") == 404
        assert get("AUDIO_GEN_WORKER_PORT", "/healthz?from=audio-worker") == 200
        assert get("MUSIC_GEN_WORKER_PORT", "/healthz?from=music-worker") == 200
        # uvicorn logs a request before it answers it.
        log = dev.log_path.read_text(errors="replace")

    if log_format == "json":
        log = "\n".join(_json_log_messages(log))
    logged = [
        '"GET /files/sound.wav?expires=1&signature=… HTTP/1.1"',
        '"GET /v1/tasks/no-such-sound HTTP/1.1" 404',
        '"GET /v1/tasks/no-such-music HTTP/1.1" 404',
    ]
    assert [log.count(line) for line in logged] == [1 if access_log else 0] * 3, log
    assert "from=" not in log and "s3cr3t" not in log
    if not access_log:
        assert " HTTP/1.1" not in log


def _json_log_messages(log: str) -> list[str]:
    """The messages of a JSON log, checking that every line but the banner's
    (printed on stdout, which the test's log file shares) is a log record."""
    lines = log.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("AudioCraft Service (dev)"))
    end = next(i for i in range(start, len(lines)) if lines[i].startswith("  curl -s http"))
    messages = []
    for line in lines[:start] + lines[end + 1 :]:
        if line.strip():
            record = json.loads(line)
            assert set(record) == {"time", "level", "logger", "message"}, record
            messages.append(record["message"])
    assert any("listening on" in message for message in messages), log
    return messages


def check_cancel(base_url: str, ports: StackPorts, receiver: Receiver) -> None:
    """A cancel reaches the sub-service (its record says canceled, so no worker
    runs the task again) and ends the workflow with a canceled webhook."""
    auth = {"Authorization": f"Bearer {MARKETPLACE_TOKEN}"}
    body = {
        "user_id": "dev-user",
        "prompt": "a long drone",
        "duration": 30,
        "callback_url": f"{receiver.url}/webhook",
    }
    call = httpx.post(f"{base_url}/v1/call", headers=auth, json=body, timeout=10)
    task_id = call.json()["task_id"]
    audio_gen = f"http://127.0.0.1:{ports.values['AUDIO_GEN_PORT']}"
    internal = {"Authorization": "Bearer dev-internal-token"}

    def dispatched() -> bool:
        found = httpx.get(f"{audio_gen}/v1/tasks/{task_id}", headers=internal, timeout=10)
        return found.status_code == 200

    deadline = time.monotonic() + 30
    while not dispatched():
        assert time.monotonic() < deadline, "never handed to the AudioGen API"
        time.sleep(0.05)

    canceled = httpx.post(f"{base_url}/v1/cancel/{task_id}", headers=auth, timeout=10)

    assert canceled.status_code == 200, canceled.text
    assert canceled.json()["status"] == "canceled"
    record = httpx.get(f"{audio_gen}/v1/tasks/{task_id}", headers=internal, timeout=10).json()
    assert record["status"] == "canceled"
    got = receiver.wait_for(lambda requests: len(requests) >= 2, timeout_s=30)
    webhook = verify_standard_webhook(got[1], WEBHOOK_SECRET)
    assert (webhook["task_id"], webhook["status"]) == (task_id, "canceled")


def dev_running_a_task(
    processes: list[ServiceProcess], ports: StackPorts, data_dir: str, *, step_delay_ms: int
) -> tuple[ServiceProcess, str]:
    """dev started on ``data_dir`` and running a 2 s sound task: dev and the task's
    result URL."""
    auth = {"Authorization": f"Bearer {MARKETPLACE_TOKEN}"}
    dev = ServiceProcess("dev", ["dev", "--data-dir", data_dir], dev_env(ports, step_delay_ms))
    processes.append(dev)
    dev.wait_http(f"{ports.app_url}/readyz")
    body = {"user_id": "dev-user", "prompt": "rain", "kinds": ["sound"], "duration": 2}
    call = httpx.post(f"{ports.app_url}/v1/call", headers=auth, json=body, timeout=10)
    result_url = f"{ports.app_url}/v1/result/{call.json()['task_id']}"
    deadline = time.monotonic() + 30
    while httpx.get(result_url, headers=auth, timeout=10).json()["status"] != "running":
        assert time.monotonic() < deadline, "the task never started"
        time.sleep(0.1)
    return dev, result_url


def test_dev_killed_mid_task_runs_it_again_when_restarted(tmp_path: Path) -> None:
    """The in-process broker and task store die with dev: a task that was running
    must be handed on again by the next start on the same data directory, not be
    left running until the hard deadline (hours)."""
    ports = StackPorts.allocate()
    auth = {"Authorization": f"Bearer {MARKETPLACE_TOKEN}"}
    data_dir = str(tmp_path / "data")
    with service_processes() as processes:
        # 50 steps per audio second at 100 ms: 2 s of audio take 10 s to generate.
        first, result_url = dev_running_a_task(processes, ports, data_dir, step_delay_ms=100)
        first.process.kill()
        first.process.wait(timeout=10)

        second = ServiceProcess("dev", ["dev", "--data-dir", data_dir], dev_env(ports, 0))
        processes.append(second)
        second.wait_http(f"{ports.app_url}/readyz")
        deadline = time.monotonic() + 30
        while (result := httpx.get(result_url, headers=auth, timeout=10).json())[
            "status"
        ] != "succeeded":
            assert time.monotonic() < deadline, f"not run again after the restart: {result}"
            time.sleep(0.1)
        assert "handed to the sub-services again" in second.log()
        (output,) = result["outputs"]
        audio = httpx.get(output["url"], timeout=10)
        assert soundfile.info(io.BytesIO(audio.content)).duration == pytest.approx(2.0)


def test_dev_stopping_refuses_new_calls_and_lets_the_running_task_finish(tmp_path: Path) -> None:
    """SIGINT (SPEC §6: stop taking work): new calls are refused with 503 at once,
    while the task under way still finishes and reports; then dev exits cleanly."""
    ports = StackPorts.allocate()
    auth = {"Authorization": f"Bearer {MARKETPLACE_TOKEN}"}
    data_dir = str(tmp_path / "data")
    with service_processes() as processes:
        # 50 steps per audio second at 60 ms: 2 s of audio take 6 s to generate.
        dev, result_url = dev_running_a_task(processes, ports, data_dir, step_delay_ms=60)
        body = {"user_id": "dev-user", "prompt": "rain", "kinds": ["sound"], "duration": 2}

        dev.process.send_signal(signal.SIGINT)
        # The signal and a call race into one event loop: give the stop a moment.
        deadline = time.monotonic() + 5
        while (
            refused := httpx.post(f"{ports.app_url}/v1/call", headers=auth, json=body, timeout=10)
        ).status_code != 503:
            assert time.monotonic() < deadline, f"calls still taken: {refused.text}"
            time.sleep(0.05)
        assert "shutting down" in refused.json()["message"]
        assert httpx.get(result_url, headers=auth, timeout=10).status_code == 200
        assert dev.process.wait(timeout=30) == 0
        assert "Traceback" not in dev.log_path.read_text(errors="replace")

        # The task finished in the drain: the next start finds nothing to hand on.
        again = ServiceProcess("dev", ["dev", "--data-dir", data_dir], dev_env(ports, 0))
        processes.append(again)
        again.wait_http(f"{ports.app_url}/readyz")
        assert httpx.get(result_url, headers=auth, timeout=10).json()["status"] == "succeeded"
        assert "handed to the sub-services again" not in again.log()
