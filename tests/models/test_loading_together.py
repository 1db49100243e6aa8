"""Both backends in one process, as ``dev`` runs them: the tiny models built by
the CLI and loaded by two threads at once, in a process that has imported
neither audiocraft nor transformers yet (the race is in their first import)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.models

ROOT = Path(__file__).resolve().parents[2]

LOAD_BOTH_AT_ONCE = r"""
import sys
import threading

from audio_gen.service import SPEC as SOUND
from music_gen.service import SPEC as MUSIC

sound_model, music_model = sys.argv[1:3]
adapters = {
    "sound": SOUND.backends["audiocraft"](
        SOUND.settings_class(backend="audiocraft", model=sound_model), SOUND
    ),
    "music": MUSIC.backends["transformers"](
        MUSIC.settings_class(backend="transformers", model=music_model), MUSIC
    ),
}
failures = []


def load(kind):
    try:
        adapters[kind].load()
    except Exception as exc:
        failures.append(f"{kind}: {exc!r}")


threads = [threading.Thread(target=load, args=(kind,)) for kind in adapters]
for thread in threads:
    thread.start()
for thread in threads:
    thread.join()
if failures:
    sys.exit("\n".join(failures))
for kind, adapter in adapters.items():
    print(kind, adapter.describe()["backend"], adapter.sample_rate)
"""


def run_cli(
    arguments: list[str], *, cwd: Path | None = None, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    """``audiocraft-service ARGUMENTS`` in a fresh Python process."""
    return subprocess.run(
        [sys.executable, "-m", "core_base.cli", *arguments],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=cwd,
        env=env,
        check=False,
    )


def build_tiny_model(directory: Path, *options: str) -> Path:
    built = run_cli(["build-tiny-model", str(directory), *options])
    assert built.returncode == 0, built.stdout + built.stderr
    return Path(built.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, Path]:
    """(the AudioGen directory, with its hub stand-ins; its model; a MusicGen)."""
    root = tmp_path_factory.mktemp("together")
    sound = build_tiny_model(root / "audiogen", "--kind", "sound", "--backend", "audiocraft")
    music = build_tiny_model(root / "musicgen", "--kind", "music")
    return root / "audiogen", sound, music


def test_build_tiny_model_sound_on_audiocraft_is_an_audiogen(
    models: tuple[Path, Path, Path],
) -> None:
    audiogen_dir, _, _ = models
    # AudioGen's text encoder is T5-large (MusicGen's is T5-base); MusicGen alone
    # would also need the 32 kHz EnCodec from the hub.
    assert sorted(p.name for p in (audiogen_dir / "hub").iterdir()) == ["models--t5-large"]


def run_offline(
    arguments: list[str], audiogen_dir: Path, cwd: Path, **env: str
) -> subprocess.CompletedProcess[str]:
    """A fresh Python process, off the hub, with AudioGen's hub stand-ins as its cache."""
    environment = {
        **os.environ,
        "HF_HUB_OFFLINE": "1",
        "HF_HUB_CACHE": str(audiogen_dir / "hub"),
        "OMP_NUM_THREADS": "1",
        **env,
    }
    environment.pop("HF_HUB_DISABLE_PROGRESS_BARS", None)
    return subprocess.run(
        [sys.executable, *arguments],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=cwd,
        env=environment,
        check=False,
    )


def test_both_backends_load_at_once_in_a_fresh_process(models: tuple[Path, Path, Path]) -> None:
    audiogen_dir, sound, music = models
    loaded = run_offline(["-c", LOAD_BOTH_AT_ONCE, str(sound), str(music)], audiogen_dir, ROOT)
    assert loaded.returncode == 0, loaded.stderr[-3000:]
    assert sorted(loaded.stdout.splitlines()) == [
        "music transformers 32000",
        "sound audiocraft 16000",
    ]


@pytest.mark.parametrize("kind", ["sound", "music"])
def test_generate_quiet_draws_no_progress_bar_of_ours_or_the_libraries(
    models: tuple[Path, Path, Path], kind: str, tmp_path: Path
) -> None:
    """``generate -q`` on a model backend: the file, and no bar on stderr (transformers
    draws one while it loads weights, on both backends: AudioCraft's T5 too)."""
    audiogen_dir, sound, music = models
    prefix, backend, model = (
        ("AUDIO_GEN", "audiocraft", sound)
        if kind == "sound"
        else ("MUSIC_GEN", "transformers", music)
    )
    out = tmp_path / f"{kind}.wav"
    command = ["generate", "a tin drum", "--kind", kind, "--duration", "0.5", "-o", str(out), "-q"]
    generated = run_offline(
        ["-m", "core_base.cli", *command],
        audiogen_dir,
        tmp_path,
        **{f"{prefix}_BACKEND": backend, f"{prefix}_MODEL": str(model)},
    )
    assert generated.returncode == 0, generated.stderr[-3000:]
    assert out.stat().st_size > 44
    assert "it/s" not in generated.stderr and "%|" not in generated.stderr, generated.stderr


def test_build_tiny_model_says_how_to_run_it_and_that_works(tmp_path: Path) -> None:
    """The line build-tiny-model prints on stderr is all a worker needs to load
    the model offline (AudioGen's T5 comes from the hub cache it names)."""
    directory = tmp_path / "audiogen"
    built = run_cli(
        ["build-tiny-model", str(directory), "--kind", "sound", "--backend", "audiocraft"]
    )
    assert built.returncode == 0, built.stderr
    hint = next(line for line in built.stderr.splitlines() if line.startswith("use with: "))
    settings = dict(word.split("=", 1) for word in hint.removeprefix("use with: ").split())
    assert settings["AUDIO_GEN_MODEL"] == built.stdout.strip()
    environment = {
        name: value
        for name, value in os.environ.items()
        if not name.startswith(("HF_", "AUDIO_GEN_", "AUDIOCRAFT_"))
    }
    out = tmp_path / "tin.wav"
    generated = run_cli(
        ["generate", "a tin drum", "--duration", "0.5", "-o", str(out), "-q"],
        cwd=tmp_path,
        env={**environment, **settings, "OMP_NUM_THREADS": "1"},
    )
    assert generated.returncode == 0, generated.stderr[-3000:]
    assert out.stat().st_size > 44
