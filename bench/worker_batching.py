"""Worker throughput vs WORKER_BATCH_SIZE on the real RabbitMQ, Redis and S3 server.

The synth backend emulates a GPU decoder whose step costs the same for 1 or 16
prompts (``SYNTH_STEP_DELAY_MS`` per step, 50 steps per audio second), so this
measures what the worker's batching machinery delivers around the model:
grouping, encoding, uploads, result writes and acks.

    python bench/worker_batching.py [--tasks 48] [--step-ms 4] [--duration 1]

Needs RabbitMQ/Redis on localhost and starts a moto S3 server. Writes a section
of bench/RESULTS.md.
"""

from __future__ import annotations

import argparse
import asyncio
import subprocess
import sys
import time
import uuid
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import write_section
from core_base.adapters.factory import create_broker, create_kv, create_storage
from core_base.contracts import TaskMessage
from core_base.generation.task_store import TaskStore
from core_base.generation.worker import Worker
from core_base.settings import load_settings
from music_gen.service import SPEC
from tests.support.infra import free_port, purge_queues_and_keys, wait_for_port

AMQP_URL = "amqp://guest:guest@127.0.0.1:5672/%2F"
REDIS_URL = "redis://127.0.0.1:6379/14"


async def run_once(
    batch_size: int, tasks: int, step_ms: float, duration_s: float, s3_url: str
) -> float:
    run_id = uuid.uuid4().hex[:8]
    settings = load_settings(
        SPEC.settings_class,
        broker_url=AMQP_URL,
        redis_url=REDIS_URL,
        storage_url=f"s3://bench-{run_id}",
        s3_endpoint_url=s3_url,
        aws_access_key="testing",
        aws_secret_key="testing",
        queue_prefix=f"bench{run_id}.",
        redis_key_prefix=f"bench:{run_id}:",
        internal_token="bench",
        worker_batch_size=batch_size,
        worker_batch_window_ms=20,
        synth_step_delay_ms=step_ms,
    )
    broker, kv, storage = create_broker(settings), create_kv(settings), create_storage(settings)
    await broker.connect()
    await storage.ensure_bucket()
    queue = SPEC.queue(settings)
    await broker.declare(queue)
    ids = [f"{run_id}-{i}" for i in range(tasks)]
    for task_id in ids:
        message = TaskMessage(
            task_id=task_id,
            prompt=f"lo-fi piano {task_id}",
            duration=duration_s,
            kind=SPEC.kind,
            model="synth",
        )
        await broker.publish(queue, message.to_bytes(), message_id=task_id)
    worker = Worker(SPEC, settings, broker=broker, kv=kv, storage=storage, manage_connections=False)
    store = TaskStore(kv, SPEC.name, 600)
    runner = asyncio.create_task(worker.run())
    while not worker.ready:  # noqa: ASYNC110 - the worker exposes readiness as a state, not an event
        await asyncio.sleep(0.01)
    started = time.perf_counter()
    pending = set(ids)
    while pending:
        done = set()
        for task_id in pending:
            record = await store.get(task_id)
            if record is not None and record.status.is_terminal:
                done.add(task_id)
        pending -= done
        await asyncio.sleep(0.02)
    elapsed_s = time.perf_counter() - started
    await worker.stop()
    await runner
    await broker.close()
    await kv.close()
    await storage.close()
    await purge_queues_and_keys(
        AMQP_URL, REDIS_URL, settings.queue_prefix, settings.redis_key_prefix
    )
    return elapsed_s


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--tasks", type=int, default=48)
    parser.add_argument("--step-ms", type=float, default=4.0)
    parser.add_argument("--duration", type=float, default=1.0)
    parser.add_argument("--batch-sizes", default="1,4,8,16")
    args = parser.parse_args()
    port = free_port()
    s3 = subprocess.Popen(
        [sys.executable, "-m", "moto.server", "-p", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        wait_for_port("127.0.0.1", port)
        rows = []
        for size in (int(s) for s in args.batch_sizes.split(",")):
            elapsed = asyncio.run(
                run_once(size, args.tasks, args.step_ms, args.duration, f"http://127.0.0.1:{port}")
            )
            rate = args.tasks / elapsed
            rows.append(f"| {size} | {elapsed:.2f} | {rate:.1f} | {rate * args.duration:.1f} |")
            print(rows[-1], flush=True)
    finally:
        s3.terminate()
    table = "\n".join(
        ["| batch size | wall s | tasks/s | audio s per s |", "|---|---|---|---|", *rows]
    )
    write_section(
        "Worker throughput vs batch size (synth, emulated GPU step)",
        f"{args.tasks} MusicGen-shaped tasks of {args.duration:g} s (32 kHz WAV), synth step cost "
        f"{args.step_ms:g} ms per step for the whole batch (50 steps per audio second), one worker, "
        "real RabbitMQ + Redis + moto S3 on the same machine.\n\n" + table,
    )


if __name__ == "__main__":
    main()
