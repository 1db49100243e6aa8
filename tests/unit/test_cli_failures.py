"""How a command that fails ends: one line for a file it cannot use, a logged
traceback (once) for a bug, and with LOG_FORMAT=json nothing on stderr but JSON
records, Python's warnings and the model libraries' lines too."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from core_base.backends.model_cache import route_library_logs
from core_base.cli import main

# A console script with one more command, "fail HOW", that fails as asked.
_FAILING_COMMAND = textwrap.dedent(
    """
    import sys, threading, warnings
    from core_base import cli
    from core_base.http.server import run_service, run_until_signalled

    def register(subparsers):
        parser = subparsers.add_parser("fail")
        parser.add_argument("how")
        parser.set_defaults(handler=handler)

    def handler(args):
        if args.how == "bug":
            raise ValueError("a bug\\nover two lines")
        if args.how == "file":
            open("missing-dir/out.wav", "wb")  # the cwd: a fresh, empty directory
        if args.how == "warning":
            warnings.warn("a library warns", DeprecationWarning, stacklevel=1)
            return 0
        if args.how == "thread":
            def crash():
                raise RuntimeError("a library's thread crashed")
            thread = threading.Thread(target=crash, name="library-thread")
            thread.start()
            thread.join()
            return 0
        if args.how == "unraisable":
            class Finalized:
                def __del__(self):
                    raise RuntimeError("raised in __del__")
            Finalized()
            return 0

        async def crashes():
            raise RuntimeError("a component crashed")

        async def stop():
            pass

        async def serve():
            await run_until_signalled([crashes], stop)

        run_service(serve())
        return 0

    cli.COMMAND_MODULES = (*cli.COMMAND_MODULES, "__main__")
    sys.exit(cli.main(["fail", sys.argv[1]]))
    """
)


def run_python(arguments: list[str], cwd: Path, **env: str) -> subprocess.CompletedProcess[str]:
    """A fresh Python process with ``env`` added (and no LOG_LEVEL of ours)."""
    environment = {**os.environ, **env}
    environment.pop("LOG_LEVEL", None)
    return subprocess.run(
        [sys.executable, *arguments],
        env=environment,
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def fail(tmp_path: Path, how: str, log_format: str) -> subprocess.CompletedProcess[str]:
    script = tmp_path / "failing.py"
    script.write_text(_FAILING_COMMAND)
    return run_python([str(script), how], tmp_path, LOG_FORMAT=log_format, PYTHONWARNINGS="default")


def records(stderr: str) -> list[dict[str, str]]:
    """Every line of stderr as a JSON log record (fails on any other line)."""
    return [json.loads(line) for line in stderr.splitlines()]


@pytest.mark.parametrize(
    ("how", "code", "says"),
    [
        ("bug", 1, "ValueError: a bug\nover two lines"),
        ("component", 1, "RuntimeError: a component crashed"),
        ("file", 1, "No such file or directory: 'missing-dir/out.wav'"),
        ("warning", 0, "DeprecationWarning: a library warns"),
        ("thread", 0, "RuntimeError: a library's thread crashed"),
        ("unraisable", 0, "RuntimeError: raised in __del__"),
    ],
)
def test_with_json_logs_every_line_is_a_record(
    tmp_path: Path, how: str, code: int, says: str
) -> None:
    result = fail(tmp_path, how, "json")

    assert result.returncode == code, result.stderr
    logged = records(result.stderr)
    assert sum(says in record["message"] + record.get("exception", "") for record in logged) == 1
    if how in ("bug", "component", "thread", "unraisable"):
        # The traceback once, inside its record.
        assert result.stderr.count("Traceback (most recent call last)") == 1
        assert any(record.get("exception", "").startswith("Traceback") for record in logged)


def test_a_crashed_component_shows_its_traceback_once(tmp_path: Path) -> None:
    result = fail(tmp_path, "component", "text")

    assert result.returncode == 1
    assert result.stderr.count("Traceback (most recent call last)") == 1, result.stderr
    assert "component failed" in result.stderr


def test_a_file_the_command_cannot_use_is_one_line(tmp_path: Path) -> None:
    result = fail(tmp_path, "file", "text")

    assert result.returncode == 1
    assert result.stderr.strip().splitlines() == [
        "audiocraft-service fail: [Errno 2] No such file or directory: 'missing-dir/out.wav'"
    ]


@pytest.mark.parametrize("port", ["99999", "-1", "http"])
def test_a_port_option_out_of_range_is_a_usage_error(
    port: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as exited:
        main(["app-api", "--port", port])
    assert exited.value.code == 2
    assert "--port: " in capsys.readouterr().err


def test_transformers_logs_through_the_root_logger(caplog: pytest.LogCaptureFixture) -> None:
    """transformers' own handler ("[transformers] ...", no propagation) gives way
    to the services' format."""
    pytest.importorskip("transformers")
    from transformers.utils import logging as transformers_logging

    transformers_logging.get_logger("transformers.test")  # its handler as it sets one up
    try:
        route_library_logs()
        library_root = logging.getLogger("transformers")
        assert library_root.propagate
        assert not [h for h in library_root.handlers if type(h) is logging.StreamHandler]
        with caplog.at_level(logging.WARNING):
            transformers_logging.get_logger("transformers.test").warning("config note")
        assert [(r.name, r.getMessage()) for r in caplog.records] == [
            ("transformers.test", "config note")
        ]
    finally:
        transformers_logging.enable_default_handler()
        transformers_logging.disable_propagation()


def test_migrate_with_json_logs_writes_nothing_but_records(tmp_path: Path) -> None:
    env = {
        "LOG_FORMAT": "json",
        "DATABASE_URL": f"sqlite:///{tmp_path}/app.db",
        "STORAGE_URL": f"file:///{tmp_path}/objects",
        "INTERNAL_TOKEN": "internal-token-for-tests",
    }
    for _ in range(2):  # applied, then up to date
        result = run_python(["-m", "core_base.cli", "migrate"], tmp_path, **env)
        assert result.returncode == 0, result.stderr
        messages = [record["message"] for record in records(result.stdout + result.stderr)]
    assert "database schema up to date" in messages
