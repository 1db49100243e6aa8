"""Fuzzing a running service against its own OpenAPI schema with Schemathesis.

Schemathesis generates requests from the schema (valid ones and near misses) and
checks each answer: never a 5xx, and status, content type, body and headers as
the schema documents them. It runs as a subprocess (its CLI is its stable
interface) against a real local server, so the event loop serving the app is
never blocked by its synchronous client.
"""

from __future__ import annotations

import asyncio
import sys
from dataclasses import dataclass
from pathlib import Path

# Cross-field rules and deployment limits (MAX_PROMPT_LEN, private callback
# addresses, a succeeded result without its output) rightly refuse some requests
# the schema allows, so "schema-valid request accepted" is not among the checks.
CHECKS = (
    "not_a_server_error",
    "status_code_conformance",
    "content_type_conformance",
    "response_schema_conformance",
    "response_headers_conformance",
)
# Fixed, so that a failure seen once is seen again on the next run.
SEED = 20261202


@dataclass(frozen=True)
class FuzzReport:
    returncode: int
    output: str

    @property
    def passed(self) -> bool:
        return self.returncode == 0


async def fuzz_against_schema(
    base_url: str,
    *,
    token: str,
    workdir: Path,
    max_examples: int = 25,
    include_path: str | None = None,
    exclude_path: str | None = None,
) -> FuzzReport:
    """Run Schemathesis' coverage and fuzzing phases on ``base_url``'s schema with
    ``Authorization: Bearer <token>``; ``include_path`` / ``exclude_path`` pick the
    operations (exact paths)."""
    command = [
        str(Path(sys.executable).with_name("schemathesis")),
        "run",
        f"{base_url}/openapi.json",
        "--header",
        f"Authorization: Bearer {token}",
        "--checks",
        ",".join(CHECKS),
        "--phases",
        "coverage,fuzzing",
        "--max-examples",
        str(max_examples),
        "--seed",
        str(SEED),
        "--generation-database",
        "none",
        "--request-timeout",
        "10",
        "--no-color",
    ]
    if include_path is not None:
        command += ["--include-path", include_path]
    if exclude_path is not None:
        command += ["--exclude-path", exclude_path]
    process = await asyncio.create_subprocess_exec(
        *command,
        cwd=workdir,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )
    output, _ = await process.communicate()
    assert process.returncode is not None
    return FuzzReport(process.returncode, output.decode(errors="replace"))
