"""``audiocraft-service generate`` (core_base.audio.commands) through the real CLI."""

from __future__ import annotations

import errno
import re
from pathlib import Path

import pytest

from core_base.audio.encoding import decode
from core_base.cli import main

_SETTINGS_WE_SET = (
    "AUDIO_GEN_BACKEND",
    "MUSIC_GEN_BACKEND",
    "AUDIO_GEN_MODEL",
    "MUSIC_GEN_MODEL",
    "MAX_DURATION",
    "MAX_PROMPT_LEN",
    "SYNTH_STEP_DELAY_MS",
)


@pytest.fixture(autouse=True)
def _isolated(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """Defaults only: no .env of the checkout, no inherited settings."""
    monkeypatch.chdir(tmp_path)
    for name in _SETTINGS_WE_SET:
        monkeypatch.delenv(name, raising=False)
    # -q turns the hub's progress bars off for the process: not for later tests.
    monkeypatch.setenv("HF_HUB_DISABLE_PROGRESS_BARS", "")
    monkeypatch.delenv("HF_HUB_DISABLE_PROGRESS_BARS")


def test_generates_a_wav_of_the_requested_length(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "dog.wav"

    code = main(["generate", "a dog barking", "--duration", "2", "--seed", "1", "-o", str(out)])

    assert code == 0
    samples, rate = decode(out.read_bytes())
    assert rate == 16_000
    assert samples.shape == (1, 32_000)
    captured = capsys.readouterr()
    # Said on stderr, as the bars: stdout may carry the audio (-o -).
    assert captured.out == ""
    assert f"wrote {out} " in captured.err
    assert "seed=1" in captured.err
    assert "16000 Hz" in captured.err
    assert f"{out.stat().st_size} bytes" in captured.err
    assert "generating" in captured.err and "100/100" in captured.err, "a progress bar"


def test_music_kind_uses_the_music_service(tmp_path: Path) -> None:
    out = tmp_path / "nested" / "song.flac"

    code = main(
        ["generate", "lo-fi piano", "--kind", "music", "--duration", "1.5", "-o", str(out), "-q"]
    )

    assert code == 0
    samples, rate = decode(out.read_bytes())
    assert (rate, samples.shape) == (32_000, (1, 48_000))
    assert out.read_bytes()[:4] == b"fLaC", "the format follows the extension"


def test_explicit_format_and_mp3(tmp_path: Path) -> None:
    out = tmp_path / "rain.audio"

    code = main(["generate", "rain", "--duration", "1", "--format", "mp3", "-o", str(out), "-q"])

    assert code == 0
    samples, rate = decode(out.read_bytes())
    assert (rate, samples.shape[1]) == (16_000, 16_000)


@pytest.mark.parametrize(
    ("output", "extra", "says"),
    [
        ("rain.ogg", [], ".ogg is not one of .flac, .mp3, .wav"),
        ("rain.wav", ["--format", "mp3"], "is not named .mp3"),
    ],
)
def test_an_output_name_of_another_format_exits_2_before_generating(
    output: str, extra: list[str], says: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """WAV data in a file named .ogg, or mp3 in a .wav: players trust the name."""
    out = tmp_path / output

    code = main(["generate", "rain", "--duration", "1", "-o", str(out), "-q", *extra])

    assert code == 2
    err = capsys.readouterr().err
    assert f"output: {out}" in err and says in err, err
    assert not out.exists()


def test_the_same_seed_writes_the_same_file(tmp_path: Path) -> None:
    first, second = tmp_path / "a.wav", tmp_path / "b.wav"
    args = ["generate", "birds", "--duration", "1", "--seed", "9", "--temperature", "0.8", "-q"]

    assert main([*args, "-o", str(first)]) == 0
    assert main([*args, "-o", str(second)]) == 0

    assert first.read_bytes() == second.read_bytes()


def test_a_random_seed_is_chosen_and_printed(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code = main(["generate", "wind", "--duration", "0.5", "-q"])

    assert code == 0
    match = re.search(r"seed=(\d+)", capsys.readouterr().err)
    assert match is not None
    default_path = tmp_path / f"sound-{match.group(1)}.wav"
    assert default_path.exists(), "default output name: <kind>-<seed>.<format>"


@pytest.mark.parametrize("duration", ["31", "0", "-2", "nan"])
def test_a_bad_duration_exits_2_naming_the_field(
    duration: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "x.wav"

    code = main(["generate", "a dog", "--duration", duration, "-o", str(out), "-q"])

    assert code == 2
    err = capsys.readouterr().err
    assert "duration" in err and "MAX_DURATION" in err
    assert "Traceback" not in err
    assert not out.exists()


def test_the_duration_limit_comes_from_settings(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("MAX_DURATION", "3")

    assert main(["generate", "a dog", "--duration", "4", "-q"]) == 2
    assert "<= 3" in capsys.readouterr().err


def test_a_too_long_prompt_exits_2(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("MAX_PROMPT_LEN", "10")

    assert main(["generate", "a dog barking at night", "-q"]) == 2
    assert "prompt" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("flag", "value"), [("--temperature", "0"), ("--top-k", "-1"), ("--seed", "-5")]
)
def test_bad_sampling_params_and_seed_exit_2(
    flag: str, value: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["generate", "a dog", flag, value, "-q"]) == 2
    assert flag.lstrip("-") in capsys.readouterr().err


def test_a_backend_the_service_lacks_is_a_settings_error(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("AUDIO_GEN_BACKEND", "transformers")  # no AudioGen in transformers

    assert main(["generate", "a dog", "-q"]) == 2
    err = capsys.readouterr().err
    assert "AUDIO_GEN_BACKEND" in err
    assert "Traceback" not in err


def test_a_malformed_setting_is_named(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("SYNTH_STEP_DELAY_MS", "fast")

    assert main(["generate", "a dog", "-q"]) == 2
    assert "SYNTH_STEP_DELAY_MS" in capsys.readouterr().err


def test_dash_writes_the_audio_to_standard_output(
    capfdbinary: pytest.CaptureFixture[bytes],
) -> None:
    code = main(["generate", "rain", "--duration", "1", "--format", "flac", "-o", "-", "-q"])

    assert code == 0
    captured = capfdbinary.readouterr()
    samples, rate = decode(captured.out)
    assert (rate, samples.shape) == (16_000, (1, 16_000))
    assert b"wrote standard output (1.00 s" in captured.err


def test_a_file_is_replaced_whole_or_left_as_it_was(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """A write that fails (a full disk) leaves the file that was there, and no
    part of the new one."""
    out = tmp_path / "rain.wav"
    out.write_bytes(b"the earlier take")

    def disk_full(fd: int) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr("core_base.files.os.fsync", disk_full)
    code = main(["generate", "rain", "--duration", "1", "-o", str(out), "-q"])

    assert code == 1
    assert f"output: {out}: No space left" in capsys.readouterr().err
    assert out.read_bytes() == b"the earlier take"
    assert [path.name for path in tmp_path.iterdir()] == ["rain.wav"]


@pytest.mark.parametrize("case", ["directory", "empty", "under-a-file"])
def test_an_output_that_cannot_be_written_exits_2_before_generating(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], case: str
) -> None:
    (tmp_path / "plain").write_text("")
    output, says = {
        "directory": (str(tmp_path), "is a directory"),
        "empty": ("", "is a directory"),
        "under-a-file": (str(tmp_path / "plain" / "x.wav"), "cannot create"),
    }[case]

    code = main(["generate", "rain", "--duration", "1", "-o", output])

    assert code == 2
    err = capsys.readouterr().err
    assert "output: " in err and says in err, err
    assert "generating" not in err and "Traceback" not in err
