"""The generation service as real processes on RabbitMQ, Redis and an S3 server
(issue #2): API → queue → worker → S3 + Redis (TTL) → callback; a worker killed
mid-task; a task outlasting the AMQP heartbeat; SIGTERM drain."""

from __future__ import annotations

import asyncio
import io
import signal
import socket
import subprocess
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any
from urllib.parse import unquote, urlsplit, urlunsplit

import aio_pika
import boto3
import httpx
import pytest
import redis
import soundfile

from audio_gen.service import SPEC as AUDIO_SPEC
from core_base.cli import EXIT_SETTINGS_ERROR, EXIT_UNAVAILABLE
from core_base.generation.task_store import task_key
from tests.support.infra import RealInfra, free_port
from tests.support.processes import ServiceProcess, service_processes
from tests.support.receiver import Receiver, run_receiver

pytestmark = pytest.mark.integration
TOKEN = "internal-test-token"
AUTH = {"Authorization": f"Bearer {TOKEN}"}


@dataclass
class Stack:
    infra: RealInfra
    env: dict[str, str]
    api_url: str
    receiver: Receiver
    processes: list[ServiceProcess]

    def start_worker(self, name: str = "worker", **extra: str) -> ServiceProcess:
        port = free_port()
        worker = ServiceProcess(
            name, ["audio-gen", "worker"], {**self.env, "AUDIO_GEN_WORKER_PORT": str(port), **extra}
        )
        self.processes.append(worker)
        worker.wait_http(f"http://127.0.0.1:{port}/readyz")
        worker.health_url = f"http://127.0.0.1:{port}"  # type: ignore[attr-defined]
        return worker

    def submit(self, **body: object) -> str:
        task_id = str(uuid.uuid4())
        payload = {
            "task_id": task_id,
            "prompt": "rain on a tin roof",
            "duration": 1.0,
            "callback_url": f"{self.receiver.url}/callback",
            **body,
        }
        response = httpx.post(f"{self.api_url}/v1/generate", json=payload, headers=AUTH, timeout=10)
        assert response.status_code == 202, response.text
        return str(payload["task_id"])

    def task(self, task_id: str) -> dict[str, object]:
        response = httpx.get(f"{self.api_url}/v1/tasks/{task_id}", headers=AUTH, timeout=10)
        assert response.status_code == 200, response.text
        body: dict[str, object] = response.json()
        return body

    def s3(self) -> Any:
        return s3_client(self.infra)


def s3_client(infra: RealInfra) -> Any:
    return boto3.client(
        "s3",
        endpoint_url=infra.s3.endpoint_url,
        aws_access_key_id=infra.s3.access_key,
        aws_secret_access_key=infra.s3.secret_key,
        region_name=infra.s3.region,
    )


@pytest.fixture
def stack(real_infra: RealInfra) -> Iterator[Stack]:
    api_port = free_port()
    env = {**real_infra.env(), "INTERNAL_TOKEN": TOKEN, "AUDIO_GEN_PORT": str(api_port)}
    # The worker uploads into the bucket; `migrate` normally creates it.
    s3_client(real_infra).create_bucket(Bucket=real_infra.bucket)
    with run_receiver() as receiver, service_processes() as processes:
        api = ServiceProcess("api", ["audio-gen", "api"], env)
        processes.append(api)
        api_url = f"http://127.0.0.1:{api_port}"
        api.wait_http(f"{api_url}/readyz")
        yield Stack(real_infra, env, api_url, receiver, processes)


def terminal_callbacks(receiver: Receiver, task_id: str) -> list[dict[str, object]]:
    bodies = [r.json() for r in receiver.snapshot()]
    return [b for b in bodies if b["task_id"] == task_id and b["status"] in ("succeeded", "failed")]


def wait_terminal(receiver: Receiver, task_id: str, timeout_s: float = 60) -> dict[str, object]:
    receiver.wait_for(lambda _: bool(terminal_callbacks(receiver, task_id)), timeout_s)
    return terminal_callbacks(receiver, task_id)[0]


def test_task_is_generated_stored_recorded_and_called_back(stack: Stack) -> None:
    stack.start_worker()
    task_id = stack.submit(duration=2.0, format="wav", seed=7)

    callback = wait_terminal(stack.receiver, task_id)

    assert callback["status"] == "succeeded", callback
    callback_request = next(r for r in stack.receiver.snapshot() if task_id in r.body.decode())
    assert callback_request.headers["authorization"] == f"Bearer {TOKEN}"
    output = callback["output"]
    assert isinstance(output, dict)
    data = stack.s3().get_object(Bucket=stack.infra.bucket, Key=output["key"])["Body"].read()
    samples, sample_rate = soundfile.read(io.BytesIO(data))
    assert sample_rate == 16_000
    assert len(samples) == 32_000  # exactly 2 s
    assert output["bytes"] == len(data)
    generation = output["generation"]
    assert generation["seed"] == 7
    assert generation["backend"] == "synth"
    assert generation["model"].startswith("synth:")
    assert generation["generation_s"] > 0
    assert generation["encode_s"] > 0 and generation["upload_s"] > 0
    # The temporary result is in Redis, with a TTL.
    client = redis.Redis.from_url(stack.infra.redis_url)
    key = stack.infra.key_prefix + task_key(AUDIO_SPEC.name, task_id)
    assert client.exists(key)
    assert 0 < client.ttl(key) <= 24 * 3600
    assert stack.task(task_id)["status"] == "succeeded"


def test_worker_killed_mid_task_is_redelivered_and_completed_once(stack: Stack) -> None:
    # 50 steps per audio second at 40 ms each: 3 s of audio takes ~6 s.
    first = stack.start_worker("worker-a", SYNTH_STEP_DELAY_MS="40")
    task_id = stack.submit(duration=3.0, format="flac")
    stack.receiver.wait_for(
        lambda got: any(task_id in r.body.decode() and '"running"' in r.body.decode() for r in got)
    )
    first.signal(signal.SIGKILL)
    first.wait_exit()

    stack.start_worker("worker-b")
    callback = wait_terminal(stack.receiver, task_id)

    assert callback["status"] == "succeeded"
    assert callback["attempts"] == 2
    objects = stack.s3().list_objects_v2(Bucket=stack.infra.bucket, Prefix=f"audio/{task_id}/")
    assert [o["Key"] for o in objects.get("Contents", [])] == [f"audio/{task_id}/sound.flac"]
    assert len(terminal_callbacks(stack.receiver, task_id)) == 1


def test_generation_longer_than_the_heartbeat_keeps_the_connection(stack: Stack) -> None:
    # Heartbeat of 1 s (a dead connection is noticed after ~2 missed beats);
    # the generation takes ~5 s and must neither drop nor be redelivered.
    worker = stack.start_worker(AMQP_HEARTBEAT_S="1", SYNTH_STEP_DELAY_MS="50")
    task_id = stack.submit(duration=2.0)
    stack.receiver.wait_for(lambda got: any(task_id in r.body.decode() for r in got))
    # Probes keep answering while the model thread is busy.
    health = httpx.get(f"{worker.health_url}/healthz", timeout=2)  # type: ignore[attr-defined]
    assert health.status_code == 200

    callback = wait_terminal(stack.receiver, task_id)

    assert callback["status"] == "succeeded"
    assert callback["attempts"] == 1  # not redelivered: the connection held


def test_sigterm_finishes_the_task_in_flight_then_exits(stack: Stack) -> None:
    worker = stack.start_worker(SYNTH_STEP_DELAY_MS="30")
    task_id = stack.submit(duration=2.0)
    stack.receiver.wait_for(
        lambda got: any(task_id in r.body.decode() and '"running"' in r.body.decode() for r in got)
    )

    worker.signal(signal.SIGTERM)

    assert worker.wait_exit(timeout_s=60) == 0
    callback = wait_terminal(stack.receiver, task_id, timeout_s=5)
    assert callback["status"] == "succeeded"
    assert callback["attempts"] == 1


def test_api_refuses_bad_tokens_bad_input_and_repeats_nothing(stack: Stack) -> None:
    url = f"{stack.api_url}/v1/generate"
    body = {"task_id": "abc", "prompt": "a dog barking", "duration": 1.0}
    assert httpx.post(url, json=body).status_code == 401
    assert httpx.post(url, json=body, headers={"Authorization": "Bearer nope"}).status_code == 401

    too_long = httpx.post(url, json={**body, "duration": 31}, headers=AUTH)
    assert too_long.status_code == 422
    assert too_long.json()["detail"][0]["field"] == "duration"
    bad_format = httpx.post(url, json={**body, "format": "ogg"}, headers=AUTH)
    assert bad_format.status_code == 422
    assert bad_format.json()["detail"][0]["field"] == "format"

    first = httpx.post(url, json=body, headers=AUTH)
    again = httpx.post(url, json=body, headers=AUTH)
    assert first.status_code == again.status_code == 202
    assert httpx.get(f"{stack.api_url}/v1/tasks/unknown", headers=AUTH).status_code == 404
    metrics = httpx.get(f"{stack.api_url}/metrics").text
    assert (
        'generation_tasks_submitted_total{outcome="duplicate",service="audio_gen"} 1.0' in metrics
    )


def test_batch_answers_each_task_on_its_own(stack: Stack) -> None:
    url = f"{stack.api_url}/v1/generate/batch"
    recorded = stack.submit()
    fresh = [str(uuid.uuid4()) for _ in range(3)]
    callback = f"{stack.receiver.url}/callback"
    tasks: list[dict[str, Any]] = [
        {"task_id": fresh[0], "prompt": "rain", "duration": 1.0, "callback_url": callback},
        {"task_id": fresh[1], "prompt": "rain", "duration": 31},  # over MAX_DURATION
        {"task_id": fresh[2], "prompt": "rain", "format": "ogg"},  # no such format
        {"task_id": recorded, "prompt": "rain on a tin roof", "duration": 1.0},
    ]
    assert httpx.post(url, json={"tasks": tasks}).status_code == 401
    empty = httpx.post(url, json={"tasks": []}, headers=AUTH)
    assert empty.status_code == 422 and empty.json()["detail"][0]["field"] == "tasks"
    twice = httpx.post(url, json={"tasks": [*tasks, tasks[0]]}, headers=AUTH, timeout=10)
    assert twice.status_code == 422 and twice.json()["detail"][0]["field"] == "tasks.4.task_id"
    assert httpx.get(f"{stack.api_url}/v1/tasks/{fresh[0]}", headers=AUTH).status_code == 404

    response = httpx.post(url, json={"tasks": tasks}, headers=AUTH, timeout=10)
    assert response.status_code == 200, response.text
    results = response.json()["results"]
    assert [r["task_id"] for r in results] == [t["task_id"] for t in tasks]
    assert results[0]["status"] == "queued"
    assert (results[1]["http_status"], results[1]["field"]) == (422, "duration")
    assert (results[2]["http_status"], results[2]["field"]) == (422, "format")
    assert results[1]["status"] is None and results[2]["status"] is None
    assert results[3]["status"] == "queued"  # recorded before: answered, not republished
    assert stack.task(fresh[0])["status"] == "queued"
    missing = httpx.get(f"{stack.api_url}/v1/tasks/{fresh[1]}", headers=AUTH)
    assert missing.status_code == 404

    metrics = httpx.get(f"{stack.api_url}/metrics").text
    for outcome, n in (("queued", 2), ("duplicate", 1), ("invalid", 2)):
        line = f'generation_tasks_submitted_total{{outcome="{outcome}",service="audio_gen"}} {n}.0'
        assert line in metrics, outcome
    # Each new task was published once: a worker generates exactly the two.
    stack.start_worker()
    assert wait_terminal(stack.receiver, fresh[0])["status"] == "succeeded"
    assert wait_terminal(stack.receiver, recorded)["status"] == "succeeded"
    time.sleep(1.0)
    finished = [
        b["task_id"]
        for b in (r.json() for r in stack.receiver.snapshot())
        if b["status"] == "succeeded"
    ]
    assert sorted(finished) == sorted([fresh[0], recorded])


@pytest.mark.parametrize("access_log", [True, False], ids=["ACCESS_LOG=true", "default"])
def test_access_log_is_a_line_per_request_when_asked_for(
    real_infra: RealInfra, access_log: bool
) -> None:
    port = free_port()
    env = {**real_infra.env(), "INTERNAL_TOKEN": TOKEN, "AUDIO_GEN_PORT": str(port)}
    if access_log:
        env["ACCESS_LOG"] = "true"
    with service_processes() as processes:
        api = ServiceProcess("api", ["audio-gen", "api"], env)
        processes.append(api)
        api.wait_http(f"http://127.0.0.1:{port}/readyz")
        missing = httpx.get(
            f"http://127.0.0.1:{port}/v1/tasks/no-such-task?signature=s3cr3t", headers=AUTH
        )
        assert missing.status_code == 404
        deadline = time.monotonic() + 5
        # A signature in a query (signed file links) is not logged.
        line = '"GET /v1/tasks/no-such-task?signature=… HTTP/1.1" 404'
        while access_log and line not in api.log() and time.monotonic() < deadline:
            time.sleep(0.05)
        if not access_log:
            time.sleep(0.5)  # as long as a line would take to be written
        assert (line in api.log()) is access_log, api.log()
        assert "s3cr3t" not in api.log()


def test_api_sheds_load_when_the_queue_is_full(real_infra: RealInfra) -> None:
    port = free_port()
    env = {
        **real_infra.env(),
        "INTERNAL_TOKEN": TOKEN,
        "AUDIO_GEN_PORT": str(port),
        "MAX_QUEUE_DEPTH": "1",
    }
    with service_processes() as processes:
        api = ServiceProcess("api", ["audio-gen", "api"], env)
        processes.append(api)
        api.wait_http(f"http://127.0.0.1:{port}/readyz")
        url = f"http://127.0.0.1:{port}/v1/generate"
        accepted = httpx.post(url, json={"task_id": "one", "prompt": "wind"}, headers=AUTH)
        assert accepted.status_code == 202

        # The publish is confirmed, but the depth RabbitMQ reports may lag a moment.
        deadline = time.monotonic() + 10
        refused = None
        attempt = 0
        while refused is None and time.monotonic() < deadline:
            attempt += 1
            r = httpx.post(url, json={"task_id": f"two-{attempt}", "prompt": "wind"}, headers=AUTH)
            if r.status_code == 503:
                refused = r
            else:
                time.sleep(0.05)
        assert refused is not None, "the API never refused a task beyond MAX_QUEUE_DEPTH"
        assert int(refused.headers["Retry-After"]) > 0
        assert refused.json()["error"] == "overloaded"
        batch = httpx.post(
            f"{url}/batch", json={"tasks": [{"task_id": "three", "prompt": "wind"}]}, headers=AUTH
        )
        assert batch.status_code == 200
        (item,) = batch.json()["results"]
        assert (item["http_status"], item["error"], item["status"]) == (503, "overloaded", None)


def test_a_task_canceled_before_a_worker_takes_it_is_not_generated(stack: Stack) -> None:
    task_id = stack.submit()
    canceled = httpx.post(f"{stack.api_url}/v1/tasks/{task_id}/cancel", headers=AUTH, timeout=10)
    assert canceled.status_code == 200, canceled.text
    assert canceled.json()["status"] == "canceled"
    # A cancel that overtakes its task's submit: the submit finds the task ended.
    overtaken = str(uuid.uuid4())
    early = httpx.post(f"{stack.api_url}/v1/tasks/{overtaken}/cancel", headers=AUTH)
    assert (early.status_code, early.json()["status"]) == (200, "canceled")
    assert stack.submit(task_id=overtaken) == overtaken
    not_an_id = httpx.post(f"{stack.api_url}/v1/tasks/{'x' * 100}%00/cancel", headers=AUTH)
    assert not_an_id.status_code == 404
    later = stack.submit()

    stack.start_worker()

    assert wait_terminal(stack.receiver, later)["status"] == "succeeded"
    # Its record's callback is repeated, as for any task that ended before.
    stack.receiver.wait_for(lambda got: any(task_id in r.body.decode() for r in got))
    assert stack.task(task_id)["status"] == "canceled"
    assert [
        r.json()["status"] for r in stack.receiver.snapshot() if task_id in r.body.decode()
    ] == ["canceled"]
    for never_run in (task_id, overtaken):
        prefix = f"audio/{never_run}/"
        objects = stack.s3().list_objects_v2(Bucket=stack.infra.bucket, Prefix=prefix)
        assert objects.get("KeyCount", 0) == 0
    assert stack.task(overtaken)["status"] == "canceled"
    # A task that ended stays as it ended.
    again = httpx.post(f"{stack.api_url}/v1/tasks/{later}/cancel", headers=AUTH, timeout=10)
    assert (again.status_code, again.json()["status"]) == (200, "succeeded")


# --- start-up refusals: one line, a prompt exit (docs/DEPLOY.md, troubleshooting) ---


def refused_start(role: str, env: dict[str, str]) -> tuple[int, str]:
    """Start ``audio-gen <role>``, which must exit on its own; its exit code and last line."""
    with service_processes() as processes:
        process = ServiceProcess(role, ["audio-gen", role, "--host", "127.0.0.1"], env)
        processes.append(process)
        try:
            code = process.wait_exit(timeout_s=30)
        except subprocess.TimeoutExpired:
            pytest.fail(f"audio-gen {role} still running:\n{process.log()}")
        log = process.log()
    assert "Traceback" not in log and "Application startup failed" not in log, log
    return code, log.strip().splitlines()[-1]


def parts_env(infra: RealInfra, **parts: str) -> dict[str, str]:
    """``infra``'s environment with RabbitMQ given by its parts (RABBITMQ_*), not BROKER_URL."""
    env = {key: value for key, value in infra.env().items() if key != "BROKER_URL"}
    url = urlsplit(infra.amqp_url)
    return {
        **env,
        "INTERNAL_TOKEN": TOKEN,
        "AUDIO_GEN_PORT": str(free_port()),
        "AUDIO_GEN_WORKER_PORT": str(free_port()),
        "RABBITMQ_HOST": url.hostname or "127.0.0.1",
        "RABBITMQ_PORT": str(url.port or 5672),
        "RABBITMQ_USER": url.username or "guest",
        "RABBITMQ_PASS": url.password or "guest",
        "RABBITMQ_VHOST": unquote(url.path[1:]) or "/",
        **parts,
    }


@pytest.mark.parametrize("role", ["api", "worker"])
def test_a_port_in_use_is_named_and_the_process_exits(real_infra: RealInfra, role: str) -> None:
    """The worker's health port taken used to leave the process hanging for good
    (aio-pika's reconnect task, mid-connect, ignored the end of the event loop)."""
    variable = "AUDIO_GEN_PORT" if role == "api" else "AUDIO_GEN_WORKER_PORT"
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        port = holder.getsockname()[1]
        env = {**real_infra.env(), "INTERNAL_TOKEN": TOKEN, variable: str(port)}
        code, line = refused_start(role, env)
    assert code == EXIT_SETTINGS_ERROR
    assert line.startswith(f"audiocraft-service: configuration error: {variable}: port {port}")


@pytest.mark.parametrize("role", ["api", "worker"])
@pytest.mark.parametrize(
    ("parts", "code", "named"),
    [
        ({"RABBITMQ_PORT": "1"}, EXIT_UNAVAILABLE, "RabbitMQ at 127.0.0.1:1 is unreachable"),
        (
            {"RABBITMQ_PASS": "not-the-password"},
            EXIT_SETTINGS_ERROR,
            "RABBITMQ_USER, RABBITMQ_PASS: ",
        ),
        ({"RABBITMQ_VHOST": "nowhere"}, EXIT_SETTINGS_ERROR, "RABBITMQ_VHOST: "),
    ],
)
def test_rabbitmq_down_or_refusing_at_start_is_one_line(
    real_infra: RealInfra, role: str, parts: dict[str, str], code: int, named: str
) -> None:
    exit_code, line = refused_start(role, parts_env(real_infra, **parts))
    assert exit_code == code
    assert named in line
    assert "not-the-password" not in line


def test_a_refused_virtual_host_in_broker_url_names_broker_url(real_infra: RealInfra) -> None:
    url = urlsplit(real_infra.amqp_url)
    env = {
        **real_infra.env(),
        "INTERNAL_TOKEN": TOKEN,
        "AUDIO_GEN_PORT": str(free_port()),
        "BROKER_URL": urlunsplit(url._replace(path="/nowhere")),
    }
    code, line = refused_start("api", env)
    assert code == EXIT_SETTINGS_ERROR
    assert line.startswith("audiocraft-service: configuration error: BROKER_URL: ")
    assert "'nowhere'" in line


@pytest.mark.parametrize("role", ["api", "worker"])
def test_a_queue_left_with_other_settings_is_one_line_naming_queue_prefix(
    real_infra: RealInfra, role: str
) -> None:
    """Queues of the same name made by another deployment (or an older version, as a
    classic queue) used to end start-up in a traceback (the API's exit in uvicorn's
    "Application startup failed"); redeclaring cannot succeed, so it is a setting."""
    name = AUDIO_SPEC.queue(AUDIO_SPEC.settings_class(queue_prefix=real_infra.queue_prefix)).name

    async def declare_classic() -> None:
        connection = await aio_pika.connect(real_infra.amqp_url)
        try:
            channel = await connection.channel()
            await channel.declare_queue(name, durable=True)
        finally:
            await connection.close()

    asyncio.run(declare_classic())
    env = {
        **real_infra.env(),
        "INTERNAL_TOKEN": TOKEN,
        "AUDIO_GEN_PORT": str(free_port()),
        "AUDIO_GEN_WORKER_PORT": str(free_port()),
    }
    code, line = refused_start(role, env)
    assert code == EXIT_SETTINGS_ERROR
    assert line.startswith(f"audiocraft-service: configuration error: QUEUE_PREFIX: queue {name!r}")
    assert "x-dead-letter-exchange" in line  # RabbitMQ's reason, as it gave it
