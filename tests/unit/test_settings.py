"""Settings: SPEC §4 names and defaults, URL overrides, one-line errors, no secrets shown."""

from __future__ import annotations

import json
import os
import tomllib
from pathlib import Path

import pytest

from audio_gen.service import SPEC as AUDIO
from core_base.errors import SettingsError
from core_base.settings import (
    LIBRARY_VARIABLES,
    AppSettings,
    CoreSettings,
    LoggingSettings,
    export_library_variables,
    load_settings,
)
from core_base.version import api_version
from music_gen.service import SPEC as MUSIC

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(autouse=True)
def clean_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    # Neither the developer's environment nor a .env in the checkout may leak in.
    monkeypatch.chdir(tmp_path)
    for name in list(__import__("os").environ):
        if name.split("_")[0] in {
            "AUDIO",
            "MUSIC",
            "APP",
            "RABBITMQ",
            "REDIS",
            "POSTGRES",
            "S3",
            "AWS",
            "MAX",
            "BROKER",
            "DATABASE",
            "STORAGE",
            "MARKETPLACE",
            "INTERNAL",
        }:
            monkeypatch.delenv(name)


def test_original_defaults() -> None:
    app = load_settings(AppSettings)
    assert app.app_api_port == 8007
    assert app.max_duration == 30
    assert app.max_prompt_len == 100
    assert app.rabbitmq_port == 5672 and app.rabbitmq_ui_port == 15672
    assert app.redis_port == 6379 and app.redis_db_name == 0
    assert app.api_name == "AudioCraft"
    audio, music = load_settings(AUDIO.settings_class), load_settings(MUSIC.settings_class)
    assert (audio.port, audio.worker_port, audio.model) == (8081, 9081, "facebook/audiogen-medium")
    assert (music.port, music.worker_port, music.model) == (8082, 9082, "facebook/musicgen-small")


def test_service_settings_read_their_own_prefix(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AUDIO_GEN_PORT", "9001")
    monkeypatch.setenv("MUSIC_GEN_BACKEND", "transformers")
    assert load_settings(AUDIO.settings_class).port == 9001
    assert load_settings(MUSIC.settings_class).port == 8082
    assert load_settings(MUSIC.settings_class).backend == "transformers"
    assert load_settings(AUDIO.settings_class).backend == "synth"


def test_urls_are_built_from_parts_and_overridden_by_full_urls(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("RABBITMQ_HOST", "mq")
    monkeypatch.setenv("RABBITMQ_PASS", "p@ss/word")
    monkeypatch.setenv("POSTGRES_PASSWORD", "pg")
    monkeypatch.setenv("REDIS_DB_NAME", "3")
    settings = load_settings(CoreSettings)
    assert settings.broker_dsn == "amqp://guest:p%40ss%2Fword@mq:5672/%2F"
    assert settings.database_dsn == "postgresql://postgres:pg@localhost:5432/postgres"
    assert settings.kv_dsn == "redis://localhost:6379/3"
    assert settings.storage_dsn == "s3://audiocraft"
    monkeypatch.setenv("BROKER_URL", "memory://")
    monkeypatch.setenv("DATABASE_URL", "sqlite:///tmp/x.db")
    monkeypatch.setenv("STORAGE_URL", "file:///tmp/files")
    settings = load_settings(CoreSettings)
    assert settings.broker_dsn == "memory://"
    assert settings.database_dsn == "sqlite:///tmp/x.db"
    assert settings.storage_dsn == "file:///tmp/files"


@pytest.mark.parametrize(
    ("variable", "value", "named"),
    [
        ("MAX_DURATION", "abc", "MAX_DURATION"),
        ("MAX_DURATION", "-1", "MAX_DURATION"),
        ("REDIS_PORT", "99999", "REDIS_PORT"),
        ("BROKER_URL", "http://nope", "BROKER_URL"),
        ("DATABASE_URL", "mysql://x", "DATABASE_URL"),
        ("STORAGE_URL", "ftp://x", "STORAGE_URL"),
        ("REDIS_URL", "memcached://x", "REDIS_URL"),
        ("AUDIO_GEN_BACKEND", "tensorflow", "AUDIO_GEN_BACKEND"),
        ("AUDIO_GEN_PORT", "eighty", "AUDIO_GEN_PORT"),
        ("WORKER_BATCH_SIZE", "0", "WORKER_BATCH_SIZE"),
    ],
)
def test_a_bad_value_names_the_variable_in_one_line(
    monkeypatch: pytest.MonkeyPatch, variable: str, value: str, named: str
) -> None:
    monkeypatch.setenv(variable, value)
    with pytest.raises(SettingsError) as caught:
        load_settings(AUDIO.settings_class)
    message = str(caught.value)
    assert message.startswith(named), message
    assert "\n" not in message


@pytest.mark.parametrize(
    ("variable", "value"),
    [
        # Requests go there with a bearer token: the HTTP client would refuse both.
        ("APP_API_URL", "http://svc:secret@app-api:8007"),
        ("AUDIO_GEN_API_URL", "http://svc@audio-gen-api:8081"),
        # A host the HTTP client refuses.
        ("MUSIC_GEN_API_URL", "http://music..gen:8082"),
        ("MARKETPLACE_CALLBACK", "https://1.2.3.4.5/hook"),
    ],
)
def test_app_api_urls_the_client_cannot_use_are_refused_naming_the_variable(
    monkeypatch: pytest.MonkeyPatch, variable: str, value: str
) -> None:
    monkeypatch.setenv(variable, value)
    with pytest.raises(SettingsError) as caught:
        load_settings(AppSettings)
    message = str(caught.value)
    assert message.startswith(variable), message
    assert "secret" not in message


@pytest.mark.parametrize(
    ("variable", "value"),
    [
        ("S3_BUCKET", "Bad_Bucket!"),
        ("S3_BUCKET", "ab"),
        ("S3_BUCKET", "a" * 64),
        ("S3_BUCKET", "-audio"),
        ("S3_BUCKET", "audio..files"),
        ("S3_BUCKET", "192.168.1.10"),
        ("STORAGE_URL", "s3://Audio"),
        ("STORAGE_URL", "s3://"),
    ],
)
def test_a_bucket_name_s3_would_refuse_stops_start_up_naming_it(
    monkeypatch: pytest.MonkeyPatch, variable: str, value: str
) -> None:
    """Every process refuses it in one line, not at its first request to S3 (a
    botocore validation traceback, or a 400 from the store)."""
    monkeypatch.setenv(variable, value)
    with pytest.raises(SettingsError, match=rf"^{variable}: .* is not a valid S3 bucket name"):
        load_settings(AUDIO.settings_class)


@pytest.mark.parametrize(
    "url", ["s3://AKIAEXAMPLE:S3CRETpw@audio", "s3://S3CRETpw@audio", "s3://S3CRET:12345/x@audio"]
)
def test_credentials_in_the_storage_url_are_refused_without_repeating_them(
    monkeypatch: pytest.MonkeyPatch, url: str
) -> None:
    monkeypatch.setenv("STORAGE_URL", url)
    with pytest.raises(SettingsError, match=r"^STORAGE_URL: credentials do not belong") as error:
        load_settings(AppSettings)
    assert "S3CRET" not in str(error.value)
    assert "AWS_ACCESS_KEY and AWS_SECRET_KEY" in str(error.value)


@pytest.mark.parametrize("bucket", ["audiocraft", "audio.files-2", "a1b", "x" * 63])
def test_valid_bucket_names_are_kept(monkeypatch: pytest.MonkeyPatch, bucket: str) -> None:
    monkeypatch.setenv("S3_BUCKET", bucket)
    assert load_settings(AppSettings).storage_dsn == f"s3://{bucket}"
    # A file store needs no bucket name: S3_BUCKET is not read then.
    monkeypatch.setenv("S3_BUCKET", "Not_Used")
    monkeypatch.setenv("STORAGE_URL", "file:///var/lib/audio")
    assert load_settings(AppSettings).storage_dsn == "file:///var/lib/audio"


@pytest.mark.parametrize(
    ("variable", "value"),
    [
        ("MARKETPLACE_CALLBACK", "notaurl"),
        ("MARKETPLACE_CALLBACK", "ftp://x.example/hook"),
        ("APP_API_URL", "garbage"),
        ("APP_API_URL", "http://app:99999"),
        ("AUDIO_GEN_API_URL", "::"),
        ("MUSIC_GEN_API_URL", "music-gen-api:8082"),
        ("S3_PUBLIC_URL", "nope"),
        ("S3_ENDPOINT_URL", "minio:9000"),
        ("S3_ENDPOINT_URL", "http:// minio:9000"),
    ],
)
def test_a_malformed_url_setting_stops_start_up_naming_it(
    monkeypatch: pytest.MonkeyPatch, variable: str, value: str
) -> None:
    """A typo in an address would otherwise show only later, as callbacks or
    webhooks that never arrive."""
    monkeypatch.setenv(variable, value)
    with pytest.raises(SettingsError, match=rf"^{variable}: must be an http\(s\) URL"):
        load_settings(AppSettings)


MALFORMED_URLS = [
    ("BROKER_URL", "amqp://guest:url-secret@127.0.0.1:abc/", "BROKER_URL: the port"),
    ("BROKER_URL", "amqp://guest:url-secret@127.0.0.1:0/", "BROKER_URL: the port"),
    ("DATABASE_URL", "postgresql://postgres:url-secret@127.0.0.1:abc/db", "DATABASE_URL: the port"),
    ("REDIS_URL", "redis://:url-secret@127.0.0.1:abc/0", "REDIS_URL: the port"),
    ("REDIS_URL", "redis://:url-secret@127.0.0.1:99999/0", "REDIS_URL: the port"),
    ("DATABASE_URL", "postgresql://postgres:url-secret@[::1/x", "DATABASE_URL: not a valid URL"),
    ("STORAGE_URL", "s3://[bucket", "STORAGE_URL: not a valid URL"),
    # Built from the parts: the host is the part that can break the URL.
    ("POSTGRES_HOST", "db:5432", "POSTGRES_HOST: the port"),
    ("RABBITMQ_HOST", "[::1", "RABBITMQ_HOST: not a valid URL"),
]


@pytest.mark.parametrize(("variable", "value", "named"), MALFORMED_URLS)
@pytest.mark.parametrize(
    "settings_class",
    [AppSettings, AUDIO.settings_class, MUSIC.settings_class],
    ids=["app", "audio-gen", "music-gen"],
)
def test_a_malformed_service_url_is_refused_naming_it(
    monkeypatch: pytest.MonkeyPatch,
    settings_class: type[CoreSettings],
    variable: str,
    value: str,
    named: str,
) -> None:
    """Not a traceback from yarl, asyncpg or redis-py once a client uses it (nor
    "unsupported URL scheme ''" for a URL that does not parse); no password shown."""
    monkeypatch.setenv(variable, value)
    with pytest.raises(SettingsError) as caught:
        load_settings(settings_class)
    message = str(caught.value)
    assert message.startswith(named), message
    assert "url-secret" not in message and "\n" not in message


def test_secrets_never_show(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MARKETPLACE_TOKEN", "tok-secret-1,tok-secret-2")
    monkeypatch.setenv("RABBITMQ_PASS", "rabbit-secret")
    monkeypatch.setenv("BROKER_URL", "ftp://user:url-secret@x")
    with pytest.raises(SettingsError) as caught:
        load_settings(AppSettings)
    assert "url-secret" not in str(caught.value)
    monkeypatch.delenv("BROKER_URL")
    settings = load_settings(AppSettings)
    shown = repr(settings) + str(settings)
    assert "tok-secret" not in shown and "rabbit-secret" not in shown
    assert settings.marketplace_tokens == ["tok-secret-1", "tok-secret-2"]


def test_required_secret_is_named_when_missing() -> None:
    settings = load_settings(AppSettings)
    with pytest.raises(SettingsError, match=r"^INTERNAL_TOKEN: required"):
        settings.require("internal_token")


def test_dotenv_file_is_read(tmp_path: Path) -> None:
    (tmp_path / ".env").write_text("MAX_PROMPT_LEN=42\nAUDIO_GEN_MODEL=/models/x\n")
    assert load_settings(AppSettings).max_prompt_len == 42
    assert load_settings(AUDIO.settings_class).model == "/models/x"


def test_api_version_comes_from_version_json() -> None:
    assert api_version() == "0.1.4"
    assert load_settings(CoreSettings).api_version == "0.1.4"
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    assert pyproject["project"]["version"] == api_version()


def test_an_install_without_version_json_reports_the_same_api_version(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """A wheel (the images) carries no version.json: the package's metadata says
    the same version."""
    from core_base import version

    expected = json.loads((ROOT / "version.json").read_text())["api_version"]
    monkeypatch.setattr(version, "VERSION_FILE", tmp_path / "version.json")
    version.api_version.cache_clear()
    try:
        assert version.api_version() == expected
    finally:
        version.api_version.cache_clear()


def test_dotenv_configures_the_model_libraries_too(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """huggingface_hub and torch read the process environment only: what .env says
    for them is exported, unless the environment says otherwise (it wins)."""
    for name in LIBRARY_VARIABLES:
        monkeypatch.setenv(name, "")  # restored (unset) after the test
    monkeypatch.setenv("TORCH_HOME", "/from/the/environment")
    (tmp_path / ".env").write_text(
        "HF_HUB_OFFLINE=true\nHF_HOME=\nTORCH_HOME=/from/dotenv\nHF_ENDPOINT='http://hub.local'\n"
    )

    exported = export_library_variables()

    assert exported == ["HF_HUB_OFFLINE", "HF_ENDPOINT"]
    assert os.environ["HF_HUB_OFFLINE"] == "true"
    assert os.environ["HF_ENDPOINT"] == "http://hub.local"
    assert os.environ["TORCH_HOME"] == "/from/the/environment"
    assert os.environ["HF_HOME"] == ""  # empty in .env: no value


def test_without_a_dotenv_nothing_is_exported(tmp_path: Path) -> None:
    assert export_library_variables(tmp_path / "absent.env") == []


def test_a_generation_service_leaves_the_app_apis_url_of_it_alone(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """AUDIO_GEN_API_URL is where the App API reaches the service: the service
    itself never reads it, so a bad value (in a .env shared by every process)
    cannot stop it."""
    monkeypatch.setenv("AUDIO_GEN_API_URL", "not a url")
    monkeypatch.setenv("MUSIC_GEN_API_URL", "not a url")
    for spec in (AUDIO, MUSIC):
        assert load_settings(spec.settings_class).port > 0
    with pytest.raises(SettingsError, match="AUDIO_GEN_API_URL"):
        load_settings(AppSettings)


@pytest.mark.parametrize(("value", "level"), [("warn", "WARNING"), ("debug", "DEBUG")])
def test_log_level_takes_any_case_and_warn(
    monkeypatch: pytest.MonkeyPatch, value: str, level: str
) -> None:
    monkeypatch.setenv("LOG_LEVEL", value)
    assert load_settings(AppSettings).log_level == level


def test_log_level_is_read_from_dotenv_too(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("LOG_LEVEL", raising=False)
    (tmp_path / ".env").write_text("LOG_LEVEL=error\n")
    assert load_settings(LoggingSettings).log_level == "ERROR"


def test_bare_port_model_or_backend_reach_no_service(monkeypatch: pytest.MonkeyPatch) -> None:
    """Hosting platforms set PORT; only AUDIO_GEN_PORT and the like are the services'."""
    for name, value in {"PORT": "5000", "MODEL": "evil/model", "BACKEND": "audiocraft"}.items():
        monkeypatch.setenv(name, value)
    for spec in (AUDIO, MUSIC):
        settings = load_settings(spec.settings_class)
        assert (settings.port, settings.backend) != (5000, "audiocraft")
        assert settings.model != "evil/model"
    overridden = load_settings(AUDIO.settings_class, port=5001, model="m", backend="transformers")
    assert (overridden.port, overridden.model, overridden.backend) == (5001, "m", "transformers")


@pytest.mark.parametrize(
    ("variable", "value"), [("MUSIC_GEN_PORT", "0"), ("MUSIC_GEN_WORKER_PORT", "99999")]
)
def test_a_service_port_out_of_range_is_refused(
    monkeypatch: pytest.MonkeyPatch, variable: str, value: str
) -> None:
    monkeypatch.setenv(variable, value)
    with pytest.raises(SettingsError, match=rf"^{variable}: Input should be"):
        load_settings(MUSIC.settings_class)


def test_short_secrets_are_named_in_a_warning(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setenv("MARKETPLACE_TOKEN", "a-long-enough-token-1, short")
    monkeypatch.setenv("INTERNAL_TOKEN", "b")
    monkeypatch.setenv("WEBHOOK_SECRET", "whsec_" + "x" * 32)
    settings = load_settings(AppSettings)
    fields = ("marketplace_token", "internal_token", "webhook_secret")
    with caplog.at_level("WARNING", logger="core_base.settings"):
        assert settings.warn_about_short_secrets(*fields) == ["MARKETPLACE_TOKEN", "INTERNAL_TOKEN"]
    logged = caplog.text
    assert "MARKETPLACE_TOKEN: shorter than 16" in logged
    assert "a-long-enough-token-1" not in logged and "WEBHOOK_SECRET" not in logged
