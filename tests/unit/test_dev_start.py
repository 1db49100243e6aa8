"""``audiocraft-service dev`` at start-up: where it reaches its own servers, the
paths it is given, and every refusal one line and an exit (never a hang)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from core_base.adapters.factory import url_path
from core_base.dev import DevOptions, dev_environment, local_address
from tests.support.infra import free_port


@pytest.mark.parametrize(
    ("host", "address"),
    [
        ("127.0.0.1", "127.0.0.1"),
        ("0.0.0.0", "127.0.0.1"),
        ("::", "[::1]"),
        ("::1", "[::1]"),
        ("localhost", "localhost"),
        ("192.0.2.7", "192.0.2.7"),
    ],
)
def test_the_components_reach_each_other_where_they_listen(
    monkeypatch: pytest.MonkeyPatch, host: str, address: str
) -> None:
    monkeypatch.delenv("S3_PUBLIC_URL", raising=False)  # the user's would win
    assert local_address(host) == address
    options = DevOptions(host=host, data_dir=Path("/srv/dev"), marketplace_token="t")
    env = dev_environment(options, 8007, {"AUDIO_GEN_": 8081})
    assert env["APP_API_URL"] == f"http://{address}:8007"
    assert env["AUDIO_GEN_API_URL"] == f"http://{address}:8081"
    assert env["S3_PUBLIC_URL"] == f"http://{address}:8007"


def test_a_data_dir_with_url_characters_in_its_name_is_that_directory(tmp_path: Path) -> None:
    data_dir = tmp_path / "my #1 ?dev% dir"
    options = DevOptions(host="127.0.0.1", data_dir=data_dir, marketplace_token="t")
    env = dev_environment(options, 8007, {})
    assert url_path(env["DATABASE_URL"]) == str(data_dir / "audiocraft.db")
    assert url_path(env["STORAGE_URL"]) == str(data_dir / "files")


def run_dev(tmp_path: Path, data_dir: Path, **env: str) -> subprocess.CompletedProcess[str]:
    ports = {
        name: str(free_port())
        for name in (
            "APP_API_PORT",
            "AUDIO_GEN_PORT",
            "MUSIC_GEN_PORT",
            "AUDIO_GEN_WORKER_PORT",
            "MUSIC_GEN_WORKER_PORT",
        )
    }
    return subprocess.run(
        [sys.executable, "-m", "core_base.cli", "dev", "--data-dir", str(data_dir)],
        env={**os.environ, **ports, **env},
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=60,  # the bug this guards against: a process that never ended
    )


def refusal(result: subprocess.CompletedProcess[str]) -> str:
    assert result.returncode == 2, result.stderr
    lines = [line for line in result.stderr.splitlines() if "configuration error" in line]
    assert len(lines) == 1 and "Traceback" not in result.stderr, result.stderr
    return lines[0]


def test_a_storage_directory_that_cannot_be_made_is_one_line_and_an_exit(tmp_path: Path) -> None:
    data_dir = tmp_path / "data"
    data_dir.mkdir()
    (data_dir / "files").write_text("a file where the audio directory goes")
    line = refusal(run_dev(tmp_path, data_dir))
    assert f"STORAGE_URL: cannot use '{data_dir / 'files'}'" in line


def test_a_database_file_that_is_no_database_is_one_line_and_an_exit(tmp_path: Path) -> None:
    data_dir = tmp_path / "data"
    data_dir.mkdir()
    (data_dir / "audiocraft.db").write_bytes(b"not sqlite " * 100)
    line = refusal(run_dev(tmp_path, data_dir))
    assert f"DATABASE_URL: cannot open '{data_dir / 'audiocraft.db'}'" in line


def test_a_data_dir_under_a_file_is_named(tmp_path: Path) -> None:
    (tmp_path / "plain").write_text("")
    line = refusal(run_dev(tmp_path, tmp_path / "plain" / "dev"))
    assert "--data-dir: cannot use" in line


def test_two_of_its_own_servers_on_one_port_are_refused(tmp_path: Path) -> None:
    port = str(free_port())
    result = run_dev(tmp_path, tmp_path / "data", APP_API_PORT=port, AUDIO_GEN_PORT=port)
    line = refusal(result)
    assert f"AUDIO_GEN_PORT: port {port} is APP_API_PORT's too" in line
