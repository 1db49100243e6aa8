"""Running the service's real processes (``audiocraft-service ...``) in tests."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path

import httpx

LOG_DIR = Path(os.environ.get("TEST_LOG_DIR", "/tmp/audiocraft-test-logs"))


class ServiceProcess:
    def __init__(
        self, name: str, args: list[str], env: Mapping[str, str], cwd: Path | None = None
    ) -> None:
        """``cwd``: where ``python -m core_base.cli`` runs, so whose code it imports
        (another checkout of the project, for a comparison); this one's by default."""
        LOG_DIR.mkdir(parents=True, exist_ok=True)
        self.name = name
        self.log_path = LOG_DIR / f"{name}-{os.getpid()}-{time.monotonic_ns()}.log"
        self._log = self.log_path.open("wb")
        self.process = subprocess.Popen(
            [sys.executable, "-m", "core_base.cli", *args],
            env={**os.environ, "PYTHONUNBUFFERED": "1", **env},
            stdout=self._log,
            stderr=subprocess.STDOUT,
            cwd=cwd,
        )

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")[-4000:]

    def wait_http(self, url: str, timeout_s: float = 60.0, status: int = 200) -> None:
        """Poll ``url`` until it answers ``status``; fail with the process log."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise AssertionError(
                    f"{self.name} exited with {self.process.returncode}:\n{self.log()}"
                )
            try:
                if httpx.get(url, timeout=1.0).status_code == status:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.05)
        raise AssertionError(f"{self.name} not answering {url} in {timeout_s}s:\n{self.log()}")

    def signal(self, sig: signal.Signals) -> None:
        if self.process.poll() is None:
            self.process.send_signal(sig)

    def wait_exit(self, timeout_s: float = 30.0) -> int:
        return self.process.wait(timeout=timeout_s)

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=5)
        self._log.close()


@contextmanager
def service_processes() -> Iterator[list[ServiceProcess]]:
    """Collects processes started in a test and stops them all at the end."""
    started: list[ServiceProcess] = []
    try:
        yield started
    finally:
        for process in reversed(started):
            process.stop()
