"""S3 settings that the store refuses stop every process that uses S3 as it
starts (``migrate``, the App API, a worker), each with the same one line naming
the variables and exit code 2, as the real console script, against rclone's S3
server (which checks signatures). Before, a worker started, said it was ready,
and failed every task it took."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
from pathlib import Path

import pytest

from core_base.adapters.storage_s3 import S3Storage
from core_base.cli import EXIT_SETTINGS_ERROR
from tests.support.databases import migrated_sqlite
from tests.support.infra import S3Server, free_port

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]
# Read by boto3 or by the settings, when left in the environment of the tests.
_NOT_INHERITED = ("STORAGE_URL", "DATABASE_URL", "BROKER_URL", "REDIS_URL", "AWS_", "S3_")
# Generous: a process that starts instead of refusing never ends on its own.
_START_TIMEOUT_S = 60


def commands() -> dict[str, list[str]]:
    return {
        "migrate": ["migrate"],
        "app-api": ["app-api", "--host", "127.0.0.1", "--port", str(free_port())],
        "worker": ["audio-gen", "worker"],
    }


def start(args: list[str], server: S3Server, tmp_path: Path, **env: str) -> tuple[int, str]:
    """Run ``audiocraft-service args`` to its end; its exit code and stderr."""
    inherited = {k: v for k, v in os.environ.items() if not k.startswith(_NOT_INHERITED)}
    settings = {
        "DATABASE_URL": migrated_sqlite(tmp_path / "app.db"),
        "BROKER_URL": "memory://",
        "REDIS_URL": "memory://",
        "S3_ENDPOINT_URL": server.endpoint_url,
        "AWS_REGION_NAME": server.region,
        "AWS_ACCESS_KEY": server.access_key,
        "AWS_SECRET_KEY": server.secret_key,
        "AWS_EC2_METADATA_DISABLED": "true",
        "AUDIO_GEN_WORKER_PORT": str(free_port()),
        "MARKETPLACE_TOKEN": "marketplace-token-for-tests",
        "INTERNAL_TOKEN": "internal-token-for-tests",
        "WEBHOOK_SECRET": "webhook-secret-for-tests",
    }
    done = subprocess.run(
        [sys.executable, "-m", "core_base.cli", *args],
        env={**inherited, **settings, **env},
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=_START_TIMEOUT_S,
    )
    return done.returncode, done.stderr


def refusal(stderr: str) -> str:
    """The process's last word: one line, no traceback (log lines may come before)."""
    assert "Traceback" not in stderr, stderr
    return stderr.strip().splitlines()[-1]


@pytest.mark.parametrize("process", ["migrate", "app-api", "worker"])
def test_keys_the_store_refuses_are_named_in_one_line(
    sigv4_s3_server: S3Server, s3_bucket: str, tmp_path: Path, process: str
) -> None:
    code, stderr = start(
        commands()[process],
        sigv4_s3_server,
        tmp_path,
        S3_BUCKET=s3_bucket,
        AWS_SECRET_KEY="not-the-secret",
    )
    assert code == EXIT_SETTINGS_ERROR, stderr
    assert refusal(stderr).startswith(
        "audiocraft-service: configuration error: AWS_ACCESS_KEY, AWS_SECRET_KEY: S3 refused them"
    )


@pytest.mark.parametrize("process", ["app-api", "worker"])
def test_a_bucket_that_does_not_exist_is_named_in_one_line(
    sigv4_s3_server: S3Server, s3_bucket: str, tmp_path: Path, process: str
) -> None:
    """``migrate`` creates it; the processes that only use it refuse to start."""
    code, stderr = start(commands()[process], sigv4_s3_server, tmp_path, S3_BUCKET=s3_bucket)
    assert code == EXIT_SETTINGS_ERROR, stderr
    line = refusal(stderr)
    assert line.startswith(
        f"audiocraft-service: configuration error: S3_BUCKET: bucket '{s3_bucket}' does not exist"
    )
    assert "run `audiocraft-service migrate`" in line


async def test_migrate_creates_the_bucket_the_others_refused(
    sigv4_s3_server: S3Server, s3_bucket: str, tmp_path: Path
) -> None:
    code, stderr = await asyncio.to_thread(
        start, ["migrate"], sigv4_s3_server, tmp_path, S3_BUCKET=s3_bucket
    )
    assert code == 0, stderr
    storage = S3Storage(
        bucket=s3_bucket,
        endpoint_url=sigv4_s3_server.endpoint_url,
        public_url=None,
        region=sigv4_s3_server.region,
        access_key=sigv4_s3_server.access_key,
        secret_key=sigv4_s3_server.secret_key,
    )
    await storage.check()
    await storage.close()
