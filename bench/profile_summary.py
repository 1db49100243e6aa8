"""Sum up py-spy's collapsed stacks (``bench/orchestration.py --profile DIR``).

Each file holds one line per distinct stack: ``frame;frame;...;leaf count``.
For each file this prints the samples in all, then the functions that were on
the stack most often (inclusive: a function and what it called), so that the
work of one request path shows as one line however deep it goes.

    python bench/profile_summary.py DIR/webhook-0ms-round1-app-api.txt [...] [--top 40]

py-spy samples a process's threads alike: a thread that runs the model or boto3
counts beside the event loop. Frames of C code (asyncpg's protocol, httptools,
uvloop) are not seen: their time lands on the nearest Python frame above them,
often ``Runner.run``.
"""

from __future__ import annotations

import argparse
from collections import Counter
from pathlib import Path


def function_of(frame: str) -> str:
    """``name (path/to/module.py:123)`` -> ``name (module.py)``: one line per
    function whichever line of it was running."""
    name, _, location = frame.partition(" (")
    if not location:
        return name
    path = location.rsplit(":", 1)[0].rstrip(")")
    return f"{name} ({path.rsplit('/', 1)[-1]})"


def inclusive_samples(lines: list[str]) -> tuple[int, Counter[str]]:
    """Samples in all, and per function the samples with it anywhere on the stack."""
    total = 0
    on_stack: Counter[str] = Counter()
    for line in lines:
        stack, _, count_text = line.rstrip().rpartition(" ")
        if not stack or not count_text.isdigit():
            continue
        count = int(count_text)
        total += count
        for function in {function_of(frame) for frame in stack.split(";")}:
            on_stack[function] += count
    return total, on_stack


def summarise(path: Path, top: int) -> str:
    total, on_stack = inclusive_samples(path.read_text().splitlines())
    rows = [f"## {path.name}: {total} samples", "", "| samples | % | function |", "|---|---|---|"]
    for function, count in on_stack.most_common(top):
        rows.append(f"| {count} | {100 * count / max(total, 1):.1f} | `{function}` |")
    return "\n".join(rows)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("files", type=Path, nargs="+", help="py-spy raw output files")
    parser.add_argument("--top", type=int, default=40, help="functions per file")
    args = parser.parse_args(argv)
    print("\n\n".join(summarise(path, args.top) for path in args.files))


if __name__ == "__main__":
    main()
