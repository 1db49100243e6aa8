"""``audiocraft-service dev`` end to end on the model backends, on whatever device
they choose (an NVIDIA GPU when there is one).

Builds tiny randomly initialised models of the real architectures (AudioGen on
the ``audiocraft`` backend, MusicGen on ``transformers``), starts ``dev`` on
them, makes one call for both kinds, downloads the two files through their
signed URLs and checks them (length, sample rate, finite, not silent). Prints
where each model was loaded, as the workers logged it. Exits 1 on any failure;
the dev log is kept in ``--work-dir``.

    python scripts/model_smoke.py                       # device chosen as in production
    python scripts/model_smoke.py --expect-device cuda  # and fail unless it was the GPU

Needs the model stack (``scripts/install.sh --models``). Not a test: CI runs the
same flow on CPU in ``tests/e2e/test_model_flow.py``; this is the check to run
on a GPU host (``scripts/gpu_check.sh``).
"""

from __future__ import annotations

import argparse
import io
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import soundfile

DEV_TOKEN = "model-smoke-token"
DURATION_S = 3.0  # longer than the tiny AudioGen's 2.5 s window: continuation runs too
EXPECTED_RATES = {"sound": 16_000, "music": 32_000}


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def build_tiny_model(directory: Path, kind: str, backend: str) -> Path:
    """Runs ``audiocraft-service build-tiny-model``; returns the model directory it prints."""
    command = [sys.executable, "-m", "core_base.cli", "build-tiny-model", str(directory)]
    command += ["--kind", kind, "--backend", backend]
    built = subprocess.run(command, capture_output=True, text=True, timeout=600, check=False)
    if built.returncode != 0:
        raise SystemExit(f"build-tiny-model {kind}/{backend} failed:\n{built.stdout}{built.stderr}")
    return Path(built.stdout.strip().splitlines()[-1])


def wait_ready(base: str, dev: subprocess.Popen[bytes], timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if dev.poll() is not None:
            raise SystemExit(f"dev exited with {dev.returncode} before it was ready")
        try:
            if httpx.get(f"{base}/readyz", timeout=5).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(1)
    raise SystemExit(f"dev not ready after {timeout_s:.0f} s")


def call_and_wait(base: str, timeout_s: float) -> dict[str, Any]:
    auth = {"Authorization": f"Bearer {DEV_TOKEN}"}
    body = {
        "user_id": "model-smoke",
        "prompt": "rain on a tin roof, then a slow piano",
        "kinds": ["sound", "music"],
        "duration": DURATION_S,
        "seed": 7,
    }
    accepted = httpx.post(f"{base}/v1/call", json=body, headers=auth, timeout=30)
    if accepted.status_code != 202:
        raise SystemExit(f"call answered {accepted.status_code}: {accepted.text}")
    task_id = accepted.json()["task_id"]
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        result: dict[str, Any] = httpx.get(
            f"{base}/v1/result/{task_id}", headers=auth, timeout=30
        ).json()
        if result["status"] in ("succeeded", "failed", "canceled"):
            return result
        time.sleep(0.5)
    raise SystemExit(f"task {task_id} not done after {timeout_s:.0f} s")


def check_output(output: dict[str, Any]) -> str:
    """Downloads one output and returns a line describing it; raises on a bad file."""
    kind = output["kind"]
    if output["status"] != "succeeded":
        raise SystemExit(f"{kind}: {output}")
    data = httpx.get(output["url"], timeout=60).content
    samples, rate = soundfile.read(io.BytesIO(data), dtype="float32", always_2d=True)
    seconds = samples.shape[0] / rate
    problems = []
    if rate != EXPECTED_RATES[kind]:
        problems.append(f"sample rate {rate}, expected {EXPECTED_RATES[kind]}")
    if abs(seconds - DURATION_S) > 1 / rate:
        problems.append(f"{seconds:.4f} s, expected {DURATION_S}")
    if not np.isfinite(samples).all():
        problems.append("non-finite samples")
    peak = float(np.abs(samples).max())
    if peak == 0.0:
        problems.append("silent")
    if problems:
        raise SystemExit(f"{kind}: " + "; ".join(problems))
    return f"{kind}: {seconds:.3f} s at {rate} Hz, {samples.shape[1]} channel(s), peak {peak:.3f}"


def placement_lines(log: str) -> list[str]:
    """The workers' own words on where each model went."""
    markers = ("loaded on", "loading weights", "loaded and warmed up")
    return [line for line in log.splitlines() if any(m in line for m in markers)]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--work-dir", type=Path, default=None, help="default: a temporary one")
    parser.add_argument("--expect-device", choices=("cpu", "cuda"), default=None)
    parser.add_argument("--timeout-s", type=float, default=600.0)
    args = parser.parse_args(argv)
    work = args.work_dir or Path(tempfile.mkdtemp(prefix="model-smoke-"))
    work.mkdir(parents=True, exist_ok=True)

    sound_model = build_tiny_model(work / "audiogen", "sound", "audiocraft")
    music_model = build_tiny_model(work / "musicgen", "music", "transformers")
    port = free_port()
    env = {
        **os.environ,
        "MARKETPLACE_TOKEN": DEV_TOKEN,
        "APP_API_PORT": str(port),
        "AUDIO_GEN_PORT": str(free_port()),
        "MUSIC_GEN_PORT": str(free_port()),
        "AUDIO_GEN_WORKER_PORT": str(free_port()),
        "MUSIC_GEN_WORKER_PORT": str(free_port()),
        "AUDIO_GEN_BACKEND": "audiocraft",
        "AUDIO_GEN_MODEL": str(sound_model),
        "MUSIC_GEN_BACKEND": "transformers",
        "MUSIC_GEN_MODEL": str(music_model),
        # The tiny AudioGen's T5 stand-in lives in its own offline hub cache.
        "HF_HUB_OFFLINE": "1",
        "HF_HUB_CACHE": str(work / "audiogen" / "hub"),
    }
    log_path = work / "dev.log"
    base = f"http://127.0.0.1:{port}"
    with log_path.open("wb") as log:
        dev = subprocess.Popen(
            [sys.executable, "-m", "core_base.cli", "dev", "--data-dir", str(work / "data")],
            stdout=log,
            stderr=subprocess.STDOUT,
            env=env,
        )
        try:
            wait_ready(base, dev, args.timeout_s)
            started = time.monotonic()
            result = call_and_wait(base, args.timeout_s)
            elapsed = time.monotonic() - started
            if result["status"] != "succeeded":
                raise SystemExit(f"task ended {result['status']}: {result.get('error')}")
            lines = [check_output(output) for output in result["outputs"]]
        finally:
            dev.send_signal(signal.SIGINT)
            try:
                dev.wait(timeout=60)
            except subprocess.TimeoutExpired:
                dev.kill()
    placed = placement_lines(log_path.read_text(errors="replace"))
    print("\n".join(placed))
    print(f"call -> both files in {elapsed:.1f} s")
    print("\n".join(lines))
    if args.expect_device:
        device = args.expect_device
        # audiocraft logs "... loaded on DEVICE", transformers "loading weights (DTYPE, DEVICE)".
        expected = {"AudioGen": f"loaded on {device}", "MusicGen": f", {device})"}
        for family, words in expected.items():
            if not any(words in line for line in placed):
                raise SystemExit(f"{family}: not logged as loaded on {device}")
    if dev.returncode != 0:
        raise SystemExit(f"dev exited with {dev.returncode} after SIGINT (log: {log_path})")
    print(f"model smoke passed (log: {log_path})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
