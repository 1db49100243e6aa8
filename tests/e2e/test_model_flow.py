"""Issue #4 end to end: a MusicGen worker process running the ``transformers``
backend on a tiny randomly initialised model of the real architecture (built
into a directory and loaded through the real loading code) completes a task
from the App API on the real RabbitMQ, Redis, Postgres and S3 server."""

from __future__ import annotations

import io
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import soundfile

from tests.support.infra import RealInfra
from tests.support.processes import service_processes
from tests.support.receiver import Receiver, run_receiver
from tests.support.stack import (
    MARKETPLACE_TOKEN,
    WEBHOOK_SECRET,
    StackPorts,
    stack_env,
    start_stack,
    verify_standard_webhook,
)

pytestmark = [pytest.mark.integration, pytest.mark.models]


@pytest.fixture(scope="module")
def tiny_musicgen(tmp_path_factory: pytest.TempPathFactory) -> Path:
    directory = tmp_path_factory.mktemp("models") / "tiny-musicgen"
    built = subprocess.run(
        [
            sys.executable,
            "-m",
            "core_base.cli",
            "build-tiny-model",
            str(directory),
            "--kind",
            "music",
        ],
        capture_output=True,
        text=True,
        timeout=300,
        env=dict(os.environ),
    )
    assert built.returncode == 0, built.stdout + built.stderr
    return directory


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    with run_receiver() as receiver:
        yield receiver


def test_transformers_worker_completes_a_task_from_the_app_api(
    real_infra: RealInfra, receiver: Receiver, tiny_musicgen: Path
) -> None:
    ports = StackPorts.allocate()
    env = stack_env(
        real_infra,
        ports,
        MUSIC_GEN_BACKEND="transformers",
        MUSIC_GEN_MODEL=str(tiny_musicgen),
        HF_HUB_OFFLINE="1",
        # Two shared cores: one torch thread avoids oversubscription.
        OMP_NUM_THREADS="1",
    )
    auth = {"Authorization": f"Bearer {MARKETPLACE_TOKEN}"}
    with service_processes() as processes:
        start_stack(processes, env, ports, components=["music-api", "music-worker", "app-api"])
        worker = next(p for p in processes if p.name == "music-worker")
        readiness = httpx.get(f"http://127.0.0.1:{ports.values['MUSIC_GEN_WORKER_PORT']}/readyz")
        assert readiness.status_code == 200
        assert "CC-BY-NC" in readiness.text  # the weights' licence, for operators
        assert "CC-BY-NC" in worker.log()

        call = httpx.post(
            f"{ports.app_url}/v1/call",
            headers=auth,
            json={
                "user_id": "model-user",
                "prompt": "lo-fi piano with soft drums",
                "kinds": ["music"],
                "duration": 1.5,
                "seed": 11,
                "params": {"top_k": 50, "temperature": 0.9},
                "callback_url": f"{receiver.url}/webhook",
            },
            timeout=10,
        )
        assert call.status_code == 202, call.text
        task_id = call.json()["task_id"]

        got = receiver.wait_for(lambda requests: len(requests) >= 1, timeout_s=180)
        webhook = verify_standard_webhook(got[0], WEBHOOK_SECRET)
        assert webhook["task_id"] == task_id
        assert webhook["status"] == "succeeded", webhook

        result = httpx.get(f"{ports.app_url}/v1/result/{task_id}", headers=auth, timeout=10).json()
        (output,) = result["outputs"]
        generation = output["generation"]
        assert generation["backend"] == "transformers"
        assert generation["seed"] == 11
        assert generation["params"]["top_k"] == 50
        # Params left unset show the values used (AudioCraft's defaults), not null.
        assert (generation["params"]["top_p"], generation["params"]["cfg_coef"]) == (0.0, 3.0)
        assert generation["revision"]
        audio = httpx.get(output["url"], timeout=10)
        samples, sample_rate = soundfile.read(io.BytesIO(audio.content))
        assert sample_rate == 32_000
        assert len(samples) == 48_000  # exactly 1.5 s
        assert float(abs(samples).max()) > 0  # real decoded audio, not silence
