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

Needs the model stack and the dev extras (``scripts/install.sh --models``).
``tests/models/test_dev_on_models.py`` runs it on CPU in CI; ``scripts/gpu_check.sh``
runs it on a GPU host.
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
from contextlib import ExitStack
from pathlib import Path
from types import FrameType
from typing import Any

import httpx
import numpy as np
import soundfile

DEV_TOKEN = "model-smoke-token"
DURATION_S = 3.0  # longer than the tiny AudioGen's 2.5 s window: continuation runs too
EXPECTED_RATES = {"sound": 16_000, "music": 32_000}
EXPECTED_BACKENDS = {"sound": "audiocraft", "music": "transformers"}


def stop_on_sigterm() -> None:
    """A SIGTERM (a CI cancel, ``timeout``) unwinds like an error, so that dev is
    stopped on the way out rather than left running."""

    def handle(signum: int, frame: FrameType | None) -> None:
        raise SystemExit(128 + signum)

    signal.signal(signal.SIGTERM, handle)


def free_ports(count: int) -> list[int]:
    """``count`` distinct free ports (each socket held until all are chosen)."""
    with ExitStack() as stack:
        sockets = [stack.enter_context(socket.socket()) for _ in range(count)]
        for sock in sockets:
            sock.bind(("127.0.0.1", 0))
        return [int(sock.getsockname()[1]) for sock in sockets]


def build_tiny_model(directory: Path, kind: str, backend: str) -> Path:
    """Runs ``audiocraft-service build-tiny-model``; returns the model directory it prints."""
    command = [sys.executable, "-m", "core_base.cli", "build-tiny-model", str(directory)]
    command += ["--kind", kind, "--backend", backend]
    built = subprocess.run(command, capture_output=True, text=True, timeout=600, check=False)
    if built.returncode != 0:
        raise SystemExit(f"build-tiny-model {kind}/{backend} failed:\n{built.stdout}{built.stderr}")
    return Path(built.stdout.strip().splitlines()[-1])


def wait_ready(urls: list[str], dev: subprocess.Popen[bytes], timeout_s: float) -> None:
    """Until every ``/readyz`` answers 200: the App API's, and the workers' (which
    are ready once their models are loaded and warmed up)."""
    deadline = time.monotonic() + timeout_s
    waiting = list(urls)
    while waiting and time.monotonic() < deadline:
        if dev.poll() is not None:
            raise SystemExit(f"dev exited with {dev.returncode} before it was ready")
        try:
            if httpx.get(f"{waiting[0]}/readyz", timeout=5).status_code == 200:
                waiting.pop(0)
                continue
        except httpx.HTTPError:
            pass
        time.sleep(1)
    if waiting:
        raise SystemExit(f"not ready after {timeout_s:.0f} s: {', '.join(waiting)}")


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
        answer = httpx.get(f"{base}/v1/result/{task_id}", headers=auth, timeout=30)
        if answer.status_code != 200:
            raise SystemExit(f"result answered {answer.status_code}: {answer.text}")
        result: dict[str, Any] = answer.json()
        if result["status"] in ("succeeded", "failed", "canceled"):
            return result
        time.sleep(0.5)
    raise SystemExit(f"task {task_id} not done after {timeout_s:.0f} s")


def check_output(output: dict[str, Any]) -> str:
    """Downloads one output and returns a line describing it; raises on a bad file."""
    kind = output["kind"]
    if output["status"] != "succeeded":
        raise SystemExit(f"{kind}: {output}")
    backend = (output.get("generation") or {}).get("backend")
    if backend != EXPECTED_BACKENDS[kind]:
        raise SystemExit(f"{kind}: made by the {backend} backend, not {EXPECTED_BACKENDS[kind]}")
    download = httpx.get(output["url"], timeout=60)
    download.raise_for_status()
    data = download.content
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
    stop_on_sigterm()
    work = args.work_dir or Path(tempfile.mkdtemp(prefix="model-smoke-"))
    work.mkdir(parents=True, exist_ok=True)
    log_path = work / "dev.log"
    print(f"work dir {work}; dev log {log_path}", flush=True)

    sound_model = build_tiny_model(work / "audiogen", "sound", "audiocraft")
    music_model = build_tiny_model(work / "musicgen", "music", "transformers")
    app, sound_api, music_api, sound_worker, music_worker = free_ports(5)
    env = {
        # Signed URLs must point at this dev, whatever the caller's environment says.
        **{k: v for k, v in os.environ.items() if k != "S3_PUBLIC_URL"},
        "MARKETPLACE_TOKEN": DEV_TOKEN,
        "APP_API_PORT": str(app),
        "AUDIO_GEN_PORT": str(sound_api),
        "MUSIC_GEN_PORT": str(music_api),
        "AUDIO_GEN_WORKER_PORT": str(sound_worker),
        "MUSIC_GEN_WORKER_PORT": str(music_worker),
        "AUDIO_GEN_BACKEND": "audiocraft",
        "AUDIO_GEN_MODEL": str(sound_model),
        "MUSIC_GEN_BACKEND": "transformers",
        "MUSIC_GEN_MODEL": str(music_model),
        # The tiny AudioGen's T5 stand-in lives in its own offline hub cache.
        "HF_HUB_OFFLINE": "1",
        "HF_HUB_CACHE": str(work / "audiogen" / "hub"),
    }
    base = f"http://127.0.0.1:{app}"
    readiness = [base] + [f"http://127.0.0.1:{port}" for port in (sound_worker, music_worker)]
    with log_path.open("wb") as log:
        dev = subprocess.Popen(
            [sys.executable, "-m", "core_base.cli", "dev", "--data-dir", str(work / "data")],
            stdout=log,
            stderr=subprocess.STDOUT,
            env=env,
        )
        try:
            wait_ready(readiness, dev, args.timeout_s)
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
                dev.wait()
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
