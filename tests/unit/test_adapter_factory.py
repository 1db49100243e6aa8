"""The adapter factory picks the adapter by URL scheme (no network: nothing connects)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from core_base.adapters import factory
from core_base.adapters.db_postgres import PostgresDatabase
from core_base.adapters.db_sqlite import SqliteDatabase
from core_base.adapters.kv_memory import MemoryStore
from core_base.adapters.kv_redis import RedisStore
from core_base.adapters.storage_files import FileStorage, derive_signing_secret
from core_base.adapters.storage_s3 import S3Storage
from core_base.errors import SettingsError
from core_base.settings import CoreSettings, load_settings


def settings(**overrides: Any) -> CoreSettings:
    return load_settings(CoreSettings, _env_file=None, **overrides)


@pytest.fixture(autouse=True)
def clean_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("BROKER_URL", "REDIS_URL", "DATABASE_URL", "STORAGE_URL", "INTERNAL_TOKEN"):
        monkeypatch.delenv(name, raising=False)


def test_broker_by_scheme() -> None:
    amqp = factory.create_broker(settings(broker_url="amqp://guest:guest@127.0.0.1:5672/%2F"))
    assert type(amqp).__name__ == "AmqpBroker"
    memory = factory.create_broker(settings(broker_url="memory://"))
    assert type(memory).__name__ == "MemoryBroker"


def test_each_process_names_its_rabbitmq_connection() -> None:
    """RabbitMQ's management UI lists connections by name: each process its own
    (all were 'audiocraft', logged as if it were the login)."""
    from audio_gen.service import SPEC
    from core_base.generation.process import connection_name

    name = connection_name(SPEC, "worker")
    assert name.startswith("audio_gen worker on ") and name != connection_name(SPEC, "api")
    amqp = factory.create_broker(settings(broker_url="amqp://g:g@127.0.0.1:5672/%2F"), name=name)
    assert repr(amqp).startswith(f"AmqpBroker(name={name!r}")


def test_kv_by_scheme() -> None:
    redis_store = factory.create_kv(
        settings(redis_url="redis://127.0.0.1:6379/3", redis_key_prefix="p:")
    )
    assert isinstance(redis_store, RedisStore)
    assert redis_store.prefix == "p:"
    assert isinstance(factory.create_kv(settings(redis_url="memory://")), MemoryStore)
    # Without REDIS_URL the parts (REDIS_HOST ...) make a redis:// URL.
    assert isinstance(factory.create_kv(settings()), RedisStore)


def test_database_by_scheme(tmp_path: Path) -> None:
    assert isinstance(factory.create_database(settings()), PostgresDatabase)
    assert isinstance(
        factory.create_database(settings(database_url="postgres://u:p@db:5432/app")),
        PostgresDatabase,
    )
    sqlite = factory.create_database(settings(database_url=f"sqlite:///{tmp_path}/app.db"))
    assert isinstance(sqlite, SqliteDatabase)
    assert sqlite.path == f"{tmp_path}/app.db"
    memory = factory.create_database(settings(database_url="sqlite:///:memory:"))
    assert isinstance(memory, SqliteDatabase) and memory.path == ":memory:"


def test_services_bound_their_statements_and_migrations_do_not() -> None:
    serving = factory.create_database(settings())
    migrating = factory.create_database(settings(), unbounded_statements=True)
    assert isinstance(serving, PostgresDatabase) and isinstance(migrating, PostgresDatabase)
    assert serving.command_timeout_s is not None and serving.command_timeout_s > 0
    assert migrating.command_timeout_s is None


def test_storage_by_scheme(tmp_path: Path) -> None:
    s3 = factory.create_storage(
        settings(
            s3_bucket="audio-bucket",
            s3_endpoint_url="http://minio:9000",
            s3_public_url="http://cdn.example",
            aws_region_name="eu-west-1",
            aws_access_key="ak",
            aws_secret_key="sk",
        )
    )
    assert isinstance(s3, S3Storage)
    assert (s3.bucket, s3.endpoint_url, s3.public_url, s3.region) == (
        "audio-bucket",
        "http://minio:9000",
        "http://cdn.example",
        "eu-west-1",
    )
    assert "sk" not in repr(s3)
    from_url = factory.create_storage(settings(storage_url="s3://other-bucket"))
    assert isinstance(from_url, S3Storage) and from_url.bucket == "other-bucket"

    files = factory.create_storage(
        settings(storage_url=f"file://{tmp_path}/objects", internal_token="token")
    )
    assert isinstance(files, FileStorage)
    assert files.root == tmp_path / "objects"
    assert files.public_base_url == "http://localhost:8007"
    public = factory.create_storage(
        settings(
            storage_url=f"file://{tmp_path}", internal_token="token", s3_public_url="http://h:1"
        )
    )
    assert isinstance(public, FileStorage) and public.public_base_url == "http://h:1"


async def test_file_storage_signs_with_a_key_derived_from_internal_token(tmp_path: Path) -> None:
    files = factory.create_storage(settings(storage_url=f"file://{tmp_path}", internal_token="tok"))
    assert isinstance(files, FileStorage)
    url = await files.presigned_url("a.wav", expires_s=60)
    expires = int(url.split("expires=")[1].split("&")[0])
    signature = url.split("signature=")[1]
    reference = FileStorage(
        tmp_path, public_base_url="http://x", signing_secret=derive_signing_secret("tok")
    )
    assert reference.verify("a.wav", expires, signature)


def test_file_storage_needs_internal_token(tmp_path: Path) -> None:
    with pytest.raises(SettingsError, match="INTERNAL_TOKEN"):
        factory.create_storage(settings(storage_url=f"file://{tmp_path}"))


@pytest.mark.parametrize(
    ("field", "value", "variable"),
    [
        ("broker_url", "kafka://broker:9092", "BROKER_URL"),
        ("redis_url", "memcached://cache", "REDIS_URL"),
        ("database_url", "mysql://db/app", "DATABASE_URL"),
        ("storage_url", "gs://bucket", "STORAGE_URL"),
    ],
)
def test_unknown_schemes_are_refused_by_settings(field: str, value: str, variable: str) -> None:
    with pytest.raises(SettingsError, match=variable):
        settings(**{field: value})


def test_factory_refuses_an_unknown_scheme_that_bypassed_validation() -> None:
    unchecked = CoreSettings.model_construct(storage_url="gs://bucket")
    with pytest.raises(SettingsError, match="STORAGE_URL"):
        factory.create_storage(unchecked)


@pytest.mark.parametrize(
    ("url", "path"),
    [
        ("sqlite:///var/lib/app.db", "/var/lib/app.db"),
        ("sqlite:////var/lib/app.db", "/var/lib/app.db"),
        ("sqlite://./data/app.db", "./data/app.db"),
        ("file:///srv/objects", "/srv/objects"),
        ("file:///srv/with%20space", "/srv/with space"),
    ],
)
def test_url_path(url: str, path: str) -> None:
    assert factory.url_path(url) == path


def test_empty_paths_are_refused() -> None:
    with pytest.raises(SettingsError, match="DATABASE_URL"):
        factory.create_database(settings(database_url="sqlite://"))
    with pytest.raises(SettingsError, match="STORAGE_URL"):
        factory.create_storage(settings(storage_url="file://", internal_token="t"))
    with pytest.raises(SettingsError, match="STORAGE_URL"):
        factory.create_storage(settings(storage_url="s3://"))


async def test_a_wrong_postgres_password_names_the_settings_not_the_password(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The test server trusts every password, so the driver's answer to a wrong one
    stands in here (tests/integration/test_migrate.py refuses a real role)."""
    import asyncpg

    async def refuse(*args: Any, **kwargs: Any) -> None:
        raise asyncpg.InvalidPasswordError('password authentication failed for user "app"')

    monkeypatch.setattr(asyncpg, "create_pool", refuse)
    by_parts = factory.create_database(settings(postgres_user="app", postgres_password="s3cret!"))
    with pytest.raises(SettingsError, match=r"^POSTGRES_USER, POSTGRES_PASSWORD: ") as refused:
        await by_parts.connect()
    assert "s3cret" not in str(refused.value)
    by_url = factory.create_database(settings(database_url="postgresql://app:s3cret!@db/app"))
    with pytest.raises(SettingsError, match=r"^DATABASE_URL: PostgreSQL refused the login"):
        await by_url.connect()
