"""``dev`` on the model backends, end to end: tiny AudioGen (audiocraft) and
MusicGen (transformers) loaded side by side in one process, one call for both
kinds, two checked files (``scripts/model_smoke.py``, which a GPU host also runs
through ``scripts/gpu_check.sh``)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from tests.models.devices import expected_device

pytestmark = pytest.mark.models

ROOT = Path(__file__).resolve().parents[2]


def test_dev_serves_both_kinds_from_tiny_models(tmp_path: Path) -> None:
    device = expected_device()
    smoke = subprocess.run(
        [
            sys.executable,
            str(ROOT / "scripts" / "model_smoke.py"),
            "--expect-device",
            device,
            "--work-dir",
            str(tmp_path),
            "--timeout-s",
            "240",
        ],
        capture_output=True,
        text=True,
        timeout=600,
        cwd=ROOT,
        check=False,
    )
    log = (
        (tmp_path / "dev.log").read_text(errors="replace")
        if (tmp_path / "dev.log").exists()
        else ""
    )
    assert smoke.returncode == 0, smoke.stdout + smoke.stderr[-3000:] + log[-3000:]
    assert "sound: 3.000 s at 16000 Hz" in smoke.stdout
    assert "music: 3.000 s at 32000 Hz" in smoke.stdout
    assert "Traceback" not in log, log
