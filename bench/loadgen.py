"""A small closed-loop HTTP/1.1 load generator, run as its own process.

``concurrency`` keep-alive connections each send the same POST, wait for the
answer and send again, for ``warmup_s`` (not recorded) and then ``duration_s``
(recorded). It speaks raw HTTP over asyncio streams (uvloop when installed)
rather than through a full client library, so that it takes as little of the
shared CPU as it can from the server it measures.

    python bench/loadgen.py --url http://127.0.0.1:8007/v1/call --body '{"a": 1}' \\
        --header 'Authorization: Bearer x' --concurrency 32 --duration-s 10 --warmup-s 2

Writes one JSON object (to ``--report FILE``, else stdout): requests, errors,
statuses, window_s, the per-request latencies in milliseconds of the recorded
window, successful answers per second of the window (per_second), and cpu_s
(this process's own CPU time, warm-up included).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import resource
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

# An answer slower than this counts as an error and its connection is replaced.
_RESPONSE_TIMEOUT_S = 30.0


@dataclass
class Target:
    host: str
    port: int
    request: bytes


@dataclass
class Window:
    """The recorded interval; ``start`` and ``end`` are ``perf_counter`` values."""

    start: float = float("inf")
    end: float = float("inf")
    stop: bool = False
    latencies_ms: list[float] = field(default_factory=list)
    statuses: Counter[str] = field(default_factory=Counter)
    # Successful answers per second of the window, by the second they arrived in:
    # shows stalls that the totals average away.
    per_second: Counter[int] = field(default_factory=Counter)

    def record(self, sent: float, done: float, status: str) -> None:
        if self.start <= sent and done <= self.end:
            self.statuses[status] += 1
            if status.startswith("2"):
                self.latencies_ms.append((done - sent) * 1000)
                self.per_second[int(done - self.start)] += 1


def build_target(url: str, body: bytes, headers: list[str]) -> Target:
    parts = urlsplit(url)
    if parts.scheme != "http" or parts.hostname is None:
        raise SystemExit(f"--url: only http://host:port/path is supported, got {url!r}")
    port = parts.port or 80
    path = parts.path or "/"
    if parts.query:
        path += "?" + parts.query
    lines = [
        f"POST {path} HTTP/1.1",
        f"Host: {parts.hostname}:{port}",
        "Content-Type: application/json",
        f"Content-Length: {len(body)}",
        *headers,
    ]
    head = ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")
    return Target(parts.hostname, port, head + body)


async def read_response(reader: asyncio.StreamReader) -> tuple[str, bool]:
    """Read one response; returns (status code, whether the server keeps the connection)."""
    head = await reader.readuntil(b"\r\n\r\n")
    status_line, *header_lines = head.decode("latin-1").split("\r\n")
    status = status_line.split(" ", 2)[1]
    headers = {}
    for line in header_lines:
        if ":" in line:
            name, value = line.split(":", 1)
            headers[name.strip().lower()] = value.strip().lower()
    if "content-length" in headers:
        await reader.readexactly(int(headers["content-length"]))
    elif headers.get("transfer-encoding") == "chunked":
        while True:
            size = int((await reader.readuntil(b"\r\n")).split(b";")[0], 16)
            await reader.readexactly(size + 2)
            if size == 0:
                break
    return status, headers.get("connection") != "close"


async def connection_loop(target: Target, window: Window) -> None:
    writer: asyncio.StreamWriter | None = None
    reader: asyncio.StreamReader | None = None
    while not window.stop:
        if writer is None or reader is None:
            try:
                reader, writer = await asyncio.open_connection(target.host, target.port)
            except OSError:
                window.record(time.perf_counter(), time.perf_counter(), "connect-error")
                await asyncio.sleep(0.05)  # a refused connection must not spin the CPU
                continue
        sent = time.perf_counter()
        try:
            writer.write(target.request)
            status, keep = await asyncio.wait_for(read_response(reader), _RESPONSE_TIMEOUT_S)
        except (OSError, asyncio.IncompleteReadError, TimeoutError, ValueError, IndexError):
            status, keep = "io-error", False
        window.record(sent, time.perf_counter(), status)
        if not keep:
            writer.close()
            writer = reader = None
    if writer is not None:
        writer.close()


async def run(
    target: Target, concurrency: int, warmup_s: float, duration_s: float
) -> dict[str, Any]:
    window = Window()
    workers = [asyncio.create_task(connection_loop(target, window)) for _ in range(concurrency)]
    await asyncio.sleep(warmup_s)
    window.start = time.perf_counter()
    await asyncio.sleep(duration_s)
    window.end = time.perf_counter()
    window.stop = True
    # Requests still in flight finish (they fall outside the window and are not counted).
    await asyncio.wait(workers, timeout=_RESPONSE_TIMEOUT_S)
    for worker in workers:
        worker.cancel()
    ok = sum(n for status, n in window.statuses.items() if status.startswith("2"))
    return {
        "requests": sum(window.statuses.values()),
        "ok": ok,
        "errors": sum(window.statuses.values()) - ok,
        "statuses": dict(window.statuses),
        "window_s": window.end - window.start,
        "latencies_ms": window.latencies_ms,
        "per_second": [window.per_second[i] for i in range(int(duration_s))],
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--url", required=True)
    parser.add_argument("--body", required=True, help="JSON body of every request")
    parser.add_argument("--header", action="append", default=[], help="'Name: value', repeatable")
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--duration-s", type=float, default=10.0)
    parser.add_argument("--warmup-s", type=float, default=2.0)
    parser.add_argument(
        "--report", help="write the JSON report to this file (a pipe may cut a long one short)"
    )
    args = parser.parse_args()
    target = build_target(args.url, args.body.encode(), args.header)
    try:
        import uvloop

        runner: Any = uvloop.run
    except ImportError:
        runner = asyncio.run
    report = runner(run(target, args.concurrency, args.warmup_s, args.duration_s))
    usage = resource.getrusage(resource.RUSAGE_SELF)
    report["cpu_s"] = usage.ru_utime + usage.ru_stime
    if args.report:
        with open(args.report, "w", encoding="utf-8") as out:
            json.dump(report, out)
    else:
        print(json.dumps(report))


if __name__ == "__main__":
    main()
