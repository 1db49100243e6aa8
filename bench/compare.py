"""Call → webhook, this checkout against another revision, interleaved.

This machine's speed drifts by tens of percent over minutes, more than most
changes are worth, so two benchmark runs one after the other compare the
moments more than the code. Here both stacks run side by side on the same
RabbitMQ, Redis and PostgreSQL (each with its own schema, queues, keys and S3
server): the base revision from a temporary git worktree, this checkout as it
is (uncommitted changes included). Blocks of sequential calls go to each in
turn, the order flipping every block, so both meet the same drift; then the
samples are pooled per side.

    python bench/compare.py BASE_REV [--blocks 10] [--calls 30] [--batch-window-ms 0]
        [--s3-server rclone|moto]

Prints a table; writes nothing to RESULTS.md (``bench/orchestration.py`` does).
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.orchestration import (
    S3_PROCESS,
    Stack,
    WebhookSample,
    cpu_ms_per_call,
    cpu_ticks,
    infrastructure,
    mean_by_name,
    measure_webhooks,
)

ROOT = Path(__file__).resolve().parents[1]
# Processes shown in the CPU rows (the rest is the other stack, idle, and the machine).
OURS = ("app-api", "audio-gen api", "audio-gen worker", S3_PROCESS)


@contextmanager
def worktree(revision: str) -> Iterator[Path]:
    """A detached checkout of ``revision``, removed afterwards."""
    path = Path(tempfile.mkdtemp(prefix="compare-")) / "base"
    subprocess.run(
        ["git", "-C", str(ROOT), "worktree", "add", "--detach", "--quiet", str(path), revision],
        check=True,
    )
    try:
        yield path
    finally:
        subprocess.run(
            ["git", "-C", str(ROOT), "worktree", "remove", "--force", str(path)], check=False
        )


def _p50(values: list[float]) -> float:
    return statistics.median(values)


def report(samples: dict[str, list[WebhookSample]], cpu: dict[str, dict[str, float]]) -> str:
    names = list(samples)
    rows: list[tuple[str, list[float]]] = [
        ("call → webhook p50 ms", [_p50([s.webhook_ms for s in samples[n]]) for n in names]),
        ("overhead p50 ms", [_p50([s.overhead_ms for s in samples[n]]) for n in names]),
        (
            "overhead less the S3 upload, p50 ms",
            [_p50([s.overhead_less_upload_ms for s in samples[n]]) for n in names],
        ),
        ("S3 upload p50 ms", [_p50([s.upload_ms for s in samples[n]]) for n in names]),
        ("generation p50 ms", [_p50([s.generation_ms for s in samples[n]]) for n in names]),
        ("`POST /v1/call` p50 ms", [_p50([s.post_ms for s in samples[n]]) for n in names]),
    ]
    rows += [(f"CPU ms per call: {p}", [cpu[n].get(p, 0.0) for n in names]) for p in OURS]
    lines = [
        f"| | {' | '.join(names)} | difference |",
        "|---|" + "---|" * (len(names) + 1),
    ]
    for label, values in rows:
        cells = " | ".join(f"{v:.2f}" for v in values)
        lines.append(f"| {label} | {cells} | {values[1] - values[0]:+.2f} |")
    calls = ", ".join(f"{n}: {len(samples[n])}" for n in names)
    return "\n".join(lines) + f"\n\ncalls: {calls}"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("base", help="the git revision to compare this checkout with")
    parser.add_argument("--blocks", type=int, default=10, help="blocks of calls per side")
    parser.add_argument("--calls", type=int, default=30, help="sequential calls per block")
    parser.add_argument("--batch-window-ms", type=int, default=0)
    parser.add_argument(
        "--s3-server",
        choices=("rclone", "moto"),
        default="rclone",
        help="moto: for a base whose migrate fails on rclone's S3 (before ef53e30)",
    )
    args = parser.parse_args(argv)

    with ExitStack() as cleanup:
        stacks = {
            f"base ({args.base})": Stack(cwd=cleanup.enter_context(worktree(args.base))),
            "this checkout": Stack(),
        }
        for name, stack in stacks.items():
            print(f"starting {name}", flush=True)
            cleanup.enter_context(infrastructure(stack, args.s3_server))
            stack.start_apis()
            stack.start_worker(args.batch_window_ms)
            asyncio.run(measure_webhooks(stack.app_url, stack.audio_url, 10))
        samples: dict[str, list[WebhookSample]] = {name: [] for name in stacks}
        cpu: dict[str, list[dict[str, float]]] = {name: [] for name in stacks}
        for block in range(args.blocks):
            order = list(stacks) if block % 2 == 0 else list(reversed(stacks))
            for name in order:
                stack = stacks[name]
                before = cpu_ticks(stack.named)
                got = asyncio.run(measure_webhooks(stack.app_url, stack.audio_url, args.calls))
                cpu[name].append(cpu_ms_per_call(before, cpu_ticks(stack.named), len(got)))
                samples[name].extend(got)
            print(f"block {block + 1}/{args.blocks} done", flush=True)
    print(report(samples, {name: mean_by_name(readings) for name, readings in cpu.items()}))


if __name__ == "__main__":
    main()
