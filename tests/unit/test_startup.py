"""Start-up refusals of the console script: one line on stderr that names what is
wrong, and an exit code (2: a setting or the deployment; 1: a dependency down),
never a traceback."""

from __future__ import annotations

import socket
from collections.abc import Iterator
from pathlib import Path

import pytest

from core_base.cli import EXIT_SETTINGS_ERROR, EXIT_UNAVAILABLE, main
from tests.support.databases import migrated_sqlite
from tests.support.infra import free_port

SECRETS = {
    "MARKETPLACE_TOKEN": "marketplace-token-for-tests",
    "INTERNAL_TOKEN": "internal-token-for-tests",
    "WEBHOOK_SECRET": "webhook-secret-for-tests",
}


@pytest.fixture(autouse=True)
def environment(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """The secrets set, and no AWS credentials anywhere boto3 looks."""
    monkeypatch.chdir(tmp_path)  # no .env of the checkout
    for name, value in SECRETS.items():
        monkeypatch.setenv(name, value)
    for name in (
        "AWS_ACCESS_KEY",
        "AWS_SECRET_KEY",
        "AWS_ACCESS_KEY_ID",
        "AWS_SECRET_ACCESS_KEY",
        "AWS_SESSION_TOKEN",
        "AWS_PROFILE",
        "AWS_CONTAINER_CREDENTIALS_RELATIVE_URI",
        "AWS_CONTAINER_CREDENTIALS_FULL_URI",
        "AWS_WEB_IDENTITY_TOKEN_FILE",
        "LOG_LEVEL",
        "DATABASE_URL",
        "STORAGE_URL",
    ):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "no-credentials"))
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "no-config"))
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")


def app_api(port: int | None = None) -> int:
    return main(["app-api", "--host", "127.0.0.1", "--port", str(port or free_port())])


def one_line(err: str) -> str:
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    return lines[0]


def test_app_api_with_postgres_down_says_so_in_one_line(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    port = free_port()
    monkeypatch.setenv("DATABASE_URL", f"postgresql://postgres@127.0.0.1:{port}/test")
    assert app_api() == EXIT_UNAVAILABLE
    line = one_line(capsys.readouterr().err)
    assert f"PostgreSQL unreachable at 127.0.0.1:{port}: " in line, line
    assert "refused" in line.lower(), line


@pytest.mark.parametrize(
    ("dsn", "address"),
    [
        ("postgresql://u:p@db.internal:6543/app", "db.internal:6543"),
        ("postgresql://u@db.internal/app", "db.internal:5432"),
        ("postgresql://u:p@[::1]:5433/app", "[::1]:5433"),
        ("postgresql://u@[fd00::7]/app", "[fd00::7]:5432"),
        ("postgresql://u:p@h1:5432,h2:5433/app", "h1:5432,h2:5433"),
        ("postgresql:///app?host=/var/run/postgresql&port=5434", "/var/run/postgresql:5434"),
        ("postgresql:///app", "localhost:5432"),
    ],
)
def test_the_address_a_postgres_url_names(dsn: str, address: str) -> None:
    from core_base.adapters.db_postgres import _server_address

    assert _server_address(dsn) == address


def test_a_mistyped_postgres_host_is_named_in_the_one_line(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """A bare "gaierror" told the deployer nothing of which address failed."""
    monkeypatch.setenv("DATABASE_URL", "postgresql://postgres@no-such-host.invalid:5433/test")
    assert app_api() == EXIT_UNAVAILABLE
    line = one_line(capsys.readouterr().err)
    assert "PostgreSQL unreachable at no-such-host.invalid:5433: gaierror" in line, line


def test_app_api_refuses_a_database_that_was_not_migrated(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    monkeypatch.setenv("DATABASE_URL", f"sqlite:///{tmp_path}/empty.db")
    monkeypatch.setenv("STORAGE_URL", f"file://{tmp_path}/objects")
    assert app_api() == EXIT_SETTINGS_ERROR
    line = one_line(capsys.readouterr().err)
    assert "not applied" in line and "audiocraft-service migrate" in line


def test_app_api_without_s3_credentials_names_them(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    monkeypatch.setenv("DATABASE_URL", migrated_sqlite(tmp_path / "app.db"))
    monkeypatch.setenv("S3_ENDPOINT_URL", f"http://127.0.0.1:{free_port()}")
    assert app_api() == EXIT_SETTINGS_ERROR
    assert "AWS_ACCESS_KEY" in one_line(capsys.readouterr().err)


@pytest.mark.parametrize("command", [["migrate"], ["audio-gen", "worker"]])
def test_a_bucket_name_s3_would_refuse_is_named_in_one_line(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], command: list[str]
) -> None:
    """Not botocore's ParamValidationError, a traceback of 64 lines."""
    monkeypatch.setenv("S3_BUCKET", "Bad_Bucket!")
    assert main(command) == EXIT_SETTINGS_ERROR
    assert one_line(capsys.readouterr().err).startswith(
        "audiocraft-service: configuration error: S3_BUCKET: 'Bad_Bucket!' is not a valid"
    )


@pytest.mark.parametrize("level", ["TRACE", "verbose"])
def test_an_unknown_log_level_is_a_settings_error(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], level: str
) -> None:
    monkeypatch.setenv("LOG_LEVEL", level)
    assert app_api() == EXIT_SETTINGS_ERROR
    assert one_line(capsys.readouterr().err).startswith(
        "audiocraft-service: configuration error: LOG_LEVEL: must be one of"
    )
    monkeypatch.delenv("LOG_LEVEL")
    assert main(["--log-level", level, "migrate"]) == EXIT_SETTINGS_ERROR
    assert "--log-level" in one_line(capsys.readouterr().err)


@pytest.mark.parametrize(
    "command",
    [
        ["migrate"],
        ["app-api", "--port", str(free_port())],
        ["audio-gen", "api"],
        ["audio-gen", "worker"],
        ["music-gen", "api"],
        ["music-gen", "worker"],
        ["dev"],
    ],
)
def test_a_malformed_url_stops_every_process_naming_it(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], command: list[str]
) -> None:
    monkeypatch.setenv("BROKER_URL", "amqp://guest:url-secret@127.0.0.1:abc/")
    assert main(command) == EXIT_SETTINGS_ERROR
    line = one_line(capsys.readouterr().err)
    assert line.startswith("audiocraft-service: configuration error: BROKER_URL: the port"), line
    assert "url-secret" not in line


@pytest.fixture
def taken_port() -> Iterator[int]:
    """A port another process listens on."""
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        yield int(holder.getsockname()[1])


@pytest.mark.parametrize("database", ["migrated", "unreachable"])
def test_app_api_whose_port_is_taken_names_it(
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    tmp_path: Path,
    taken_port: int,
    database: str,
) -> None:
    """The port is taken first, before anything connects: a database that does not
    answer does not hide (or delay) the port in use."""
    url = (
        migrated_sqlite(tmp_path / "app.db")
        if database == "migrated"
        else f"postgresql://app@127.0.0.1:{free_port()}/app"
    )
    monkeypatch.setenv("DATABASE_URL", url)
    monkeypatch.setenv("STORAGE_URL", f"file://{tmp_path}/objects")
    monkeypatch.setenv("APP_API_PORT", str(taken_port))
    assert main(["app-api", "--host", "127.0.0.1"]) == EXIT_SETTINGS_ERROR
    line = one_line(capsys.readouterr().err)
    assert line.startswith("audiocraft-service: configuration error: APP_API_PORT: ")
    assert f"port {taken_port} is already in use" in line


@pytest.mark.parametrize("service", ["audio-gen", "music-gen"])
def test_generation_api_whose_port_is_taken_names_it(
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    taken_port: int,
    service: str,
) -> None:
    prefix = service.replace("-", "_").upper()
    monkeypatch.setenv("BROKER_URL", "memory://")
    monkeypatch.setenv("REDIS_URL", "memory://")
    monkeypatch.setenv(f"{prefix}_PORT", str(taken_port))
    assert main([service, "api", "--host", "127.0.0.1"]) == EXIT_SETTINGS_ERROR
    line = one_line(capsys.readouterr().err)
    assert line.startswith(f"audiocraft-service: configuration error: {prefix}_PORT: ")
    assert f"port {taken_port} is already in use" in line


def test_a_dotenv_that_is_not_utf8_is_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    (tmp_path / ".env").write_bytes(b"LOG_LEVEL=INFO\nNAME=caf\xe9\n")
    assert main(["migrate"]) == EXIT_SETTINGS_ERROR
    assert one_line(capsys.readouterr().err) == (
        "audiocraft-service: configuration error: .env: not UTF-8 text (byte 23: 0xe9);"
        " save it as UTF-8"
    )


def test_a_dotenv_line_that_does_not_parse_is_warned_of_once(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """.env is read by every settings class a command loads."""
    (tmp_path / ".env").write_text("not a setting\nDATABASE_URL=postgresql://a@127.0.0.1:x/\n")
    assert main(["--log-level", "INFO", "migrate"]) == EXIT_SETTINGS_ERROR  # the bad port
    warnings = [r for r in caplog.records if "could not parse" in r.getMessage()]
    assert len(warnings) == 1


@pytest.mark.parametrize("role", ["api", "worker"])
def test_a_dependency_down_names_the_process_that_ends(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], role: str
) -> None:
    """An api and a worker of one service run side by side: the line says which."""
    monkeypatch.setenv("BROKER_URL", f"amqp://guest:guest@127.0.0.1:{free_port()}/")
    monkeypatch.setenv("REDIS_URL", "memory://")
    monkeypatch.setenv("AUDIO_GEN_PORT", str(free_port()))
    monkeypatch.setenv("AUDIO_GEN_WORKER_PORT", str(free_port()))
    assert main(["audio-gen", role, "--host", "127.0.0.1"]) == EXIT_UNAVAILABLE
    line = one_line(capsys.readouterr().err)
    assert line.startswith(f"audiocraft-service audio-gen {role}: RabbitMQ at 127.0.0.1:"), line
