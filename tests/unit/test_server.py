"""A process whose component failed shuts down in order and in bounded time: a
component's ``SystemExit`` (uvicorn's, when its app cannot start) stops the
others first, and a task that ignores its cancellation (aio-pika's reconnect
loop) cannot keep the process from exiting. A second signal exits at once."""

from __future__ import annotations

import asyncio
import signal
import subprocess
import sys
import textwrap
import time

import pytest

from core_base.http.server import run_service, run_until_signalled


@pytest.mark.timeout(10)
async def test_a_component_that_exits_stops_the_others_first() -> None:
    stopped = asyncio.Event()
    closed: list[str] = []

    async def exits() -> None:  # uvicorn when its app's start-up fails
        raise SystemExit(3)

    async def serves() -> None:
        await stopped.wait()
        closed.append("other component")

    async def stop() -> None:
        stopped.set()

    # Awaited in this task: raised out of another, SystemExit would leave the loop.
    with pytest.raises(SystemExit) as raised:
        await run_until_signalled([exits, serves], stop)
    assert raised.value.code == 3
    assert closed == ["other component"]


def test_a_task_that_ignores_its_cancellation_cannot_hold_the_exit() -> None:
    async def stubborn() -> None:  # as aio-pika's reconnect loop for an unclosed connection
        while True:
            try:
                await asyncio.sleep(3600)
            except asyncio.CancelledError:
                continue

    async def main() -> None:
        asyncio.get_running_loop().create_task(stubborn())
        await asyncio.sleep(0)

    started = time.monotonic()
    run_service(main(), leftover_timeout_s=0.2)
    assert time.monotonic() - started < 5


# A service draining for ever (a batch in the model: a thread that runs on) until
# signalled twice.
_DRAINING_SERVICE = textwrap.dedent(
    """
    import asyncio, logging, threading, time
    from core_base.http.server import run_service, run_until_signalled

    logging.basicConfig(level=logging.INFO)
    threading.Thread(target=time.sleep, args=(600,)).start()

    async def serve():
        await asyncio.Event().wait()

    async def stop():
        print("draining", flush=True)
        await asyncio.Event().wait()

    run_service(run_until_signalled([serve], stop))
    """
)


def test_a_second_signal_exits_at_once_without_waiting_for_the_drain() -> None:
    process = subprocess.Popen(
        [sys.executable, "-c", _DRAINING_SERVICE],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        time.sleep(1.0)  # started: its signal handlers are in place
        process.send_signal(signal.SIGINT)
        assert process.stdout is not None
        assert process.stdout.readline() == "draining\n"
        process.send_signal(signal.SIGINT)
        assert process.wait(timeout=10) == 128 + signal.SIGINT
    finally:
        process.kill()
        _, stderr = process.communicate()
    assert "received SIGINT again: exiting now" in stderr, stderr
    assert "Traceback" not in stderr, stderr
