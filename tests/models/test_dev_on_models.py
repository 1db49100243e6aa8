"""``dev`` on the model backends, end to end: tiny AudioGen (audiocraft) and
MusicGen (transformers) loaded side by side in one process, one call for both
kinds, two checked files (``scripts/model_smoke.py``, which a GPU host also runs
through ``scripts/gpu_check.sh``)."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from tests.models.devices import expected_device

pytestmark = pytest.mark.models

ROOT = Path(__file__).resolve().parents[2]
SMOKE_TIMEOUT_S = 480  # builds, two loads and a 3 s call on 2 shared cores: ~30 s


@pytest.mark.timeout(SMOKE_TIMEOUT_S + 60)
def test_dev_serves_both_kinds_from_tiny_models(tmp_path: Path) -> None:
    command = [sys.executable, str(ROOT / "scripts" / "model_smoke.py")]
    command += ["--expect-device", expected_device(), "--work-dir", str(tmp_path)]
    command += ["--timeout-s", "240"]
    # Its own process group: whatever happens to this test, dev goes with it.
    smoke = subprocess.Popen(
        command,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=ROOT,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
        start_new_session=True,
    )
    try:
        stdout, stderr = smoke.communicate(timeout=SMOKE_TIMEOUT_S)
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(smoke.pid, signal.SIGKILL)
    log_file = tmp_path / "dev.log"
    log = log_file.read_text(errors="replace") if log_file.exists() else ""
    assert smoke.returncode == 0, stdout + stderr[-3000:] + log[-3000:]
    assert "sound: 3.000 s at 16000 Hz" in stdout
    assert "music: 3.000 s at 32000 Hz" in stdout
    assert "Traceback" not in log, log
