"""The floor under the call → webhook path: what one step of each kind costs on this
machine, measured in the same run as the path itself (so both share its noise).

A call's path is a chain of such steps (HTTP requests between the processes,
PostgreSQL statements, Redis round trips, a confirmed publish and its delivery,
the S3 upload); their sum is what the path would cost with no work of ours
around them. ``bench/orchestration.py`` reports it beside the measured overhead.
"""

from __future__ import annotations

import asyncio
import json
import os
import statistics
import time
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

import aio_pika
import asyncpg
import redis.asyncio as redis

from core_base.adapters.storage_s3 import S3Storage
from core_base.http.client import HttpClient

SAMPLES = 200
WARMUP = 20
# A 1-second 16 kHz mono WAV, as the benchmark's calls make.
AUDIO_BYTES = 32_044


@dataclass(frozen=True)
class Floor:
    """p50 milliseconds of one step of each kind."""

    http_ms: float  # a small JSON POST and its answer, to a bare FastAPI endpoint
    postgres_ms: float  # a single-row INSERT, committed (synchronous_commit on)
    redis_ms: float  # a SET
    broker_ms: float  # a persistent message, confirmed, on a quorum queue, to its consumer
    s3_ms: float  # a 32 KB PUT through the worker's storage adapter
    # The same PUT on moto's S3 behind waitress (``bench/s3_server.py``), for
    # reference: earlier runs' S3 server (this one's is rclone's).
    s3_moto_ms: float

    def path_ms(self, *, with_upload: bool) -> float:
        """The steps one call waits for in turn (see :data:`PATH_STEPS`)."""
        total = 4 * self.http_ms + 2 * self.postgres_ms + 2 * self.redis_ms + self.broker_ms
        return total + (self.s3_ms if with_upload else 0.0)


PATH_STEPS = (
    "4 HTTP requests (the call, the fan-out, the worker's callback, the webhook), "
    "2 PostgreSQL statements (the call's insert; the write that finishes the workflow, "
    "which the App API that created it need not read first), 2 Redis round trips (the sub-service's duplicate check, the worker's "
    "check before the model), one confirmed publish and its delivery, and the S3 upload"
)


async def _p50_ms(step: Callable[[], Awaitable[object]]) -> float:
    timings = []
    for index in range(WARMUP + SAMPLES):
        started = time.perf_counter()
        await step()
        if index >= WARMUP:
            timings.append(time.perf_counter() - started)
    return 1000 * statistics.median(timings)


async def measure_http(url: str, body: dict[str, object]) -> float:
    client = HttpClient()
    content = json.dumps(body).encode()
    headers = {"Content-Type": "application/json"}
    try:
        return await _p50_ms(lambda: client.post(url, content=content, headers=headers))
    finally:
        await client.aclose()


async def measure_postgres(dsn: str) -> float:
    connection = await asyncpg.connect(dsn)
    table = f"floor_{uuid.uuid4().hex[:8]}"
    try:
        await connection.execute(f"CREATE TABLE {table} (id TEXT PRIMARY KEY, at DOUBLE PRECISION)")
        return await _p50_ms(
            lambda: connection.execute(
                f"INSERT INTO {table} VALUES ($1, $2)", uuid.uuid4().hex, time.time()
            )
        )
    finally:
        await connection.execute(f"DROP TABLE IF EXISTS {table}")
        await connection.close()


async def measure_redis(url: str, key_prefix: str) -> float:
    client = redis.Redis.from_url(url)
    key = f"{key_prefix}floor"
    try:
        return await _p50_ms(lambda: client.set(key, b"x" * 300, ex=60))
    finally:
        await client.delete(key)
        await client.aclose()


async def measure_broker(url: str, queue_name: str) -> float:
    """Publish (confirmed) on one connection, consume on another, as the sub-service
    API and the worker do."""
    publisher = await aio_pika.connect(url)
    consumer = await aio_pika.connect(url)
    try:
        channel = await publisher.channel(publisher_confirms=True)
        queue = await channel.declare_queue(
            queue_name, durable=True, arguments={"x-queue-type": "quorum"}
        )
        consuming = await consumer.channel()
        delivered: asyncio.Queue[None] = asyncio.Queue()

        async def on_message(message: aio_pika.abc.AbstractIncomingMessage) -> None:
            await message.ack()
            delivered.put_nowait(None)

        await (await consuming.get_queue(queue_name)).consume(on_message)

        async def step() -> None:
            message = aio_pika.Message(b"x" * 300, delivery_mode=aio_pika.DeliveryMode.PERSISTENT)
            await channel.default_exchange.publish(message, routing_key=queue.name)
            await delivered.get()

        return await _p50_ms(step)
    finally:
        await consumer.close()
        channel = await publisher.channel()
        await channel.queue_delete(queue_name, if_unused=False, if_empty=False)
        await publisher.close()


async def measure_s3(storage: S3Storage) -> float:
    data = os.urandom(AUDIO_BYTES)
    keys = iter(range(10**9))
    try:
        return await _p50_ms(
            lambda: storage.put(f"floor/{next(keys)}.wav", data, content_type="audio/wav")
        )
    finally:
        await storage.close()
