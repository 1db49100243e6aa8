"""Build the adapters a process needs from its settings.

The scheme of each resolved URL (``settings.broker_dsn``, ``kv_dsn``,
``database_dsn``, ``storage_dsn``) picks the real or the embedded adapter.
Adapters are imported here, when chosen, so a process only loads the client
libraries it uses. Nothing connects: callers ``connect()`` / ``ensure_bucket()``.
"""

from __future__ import annotations

from pathlib import Path
from urllib.parse import unquote, urlsplit

from pydantic import SecretStr

from core_base.errors import SettingsError
from core_base.ports.broker import Broker
from core_base.ports.database import Database
from core_base.ports.kv import KeyValueStore
from core_base.ports.storage import ObjectStorage
from core_base.settings import CoreSettings

# Where FileStorage URLs point when S3_PUBLIC_URL is unset: the App API serves /files.
DEFAULT_FILES_BASE_URL = "http://localhost:8007"


def create_broker(settings: CoreSettings, *, name: str = "audiocraft") -> Broker:
    """``amqp(s)://`` -> ``AmqpBroker``; ``memory://`` -> ``MemoryBroker``. ``name``
    names the connection in RabbitMQ (its management UI lists it), so that each
    process can be told apart there."""
    url = settings.broker_dsn
    scheme = _scheme(url)
    if scheme in ("amqp", "amqps"):
        from core_base.adapters.broker_amqp import AmqpBroker

        # A refused login or virtual host names what the deployment set.
        broker: Broker = AmqpBroker(
            url,
            heartbeat_s=settings.amqp_heartbeat_s,
            name=name,
            credentials_setting=settings.named("broker_url", "RABBITMQ_USER, RABBITMQ_PASS"),
            vhost_setting=settings.named("broker_url", "RABBITMQ_VHOST"),
        )
        return broker
    if scheme == "memory":
        from core_base.adapters.broker_memory import MemoryBroker

        memory_broker: Broker = MemoryBroker()
        return memory_broker
    raise _unsupported("BROKER_URL", scheme)


def create_kv(settings: CoreSettings) -> KeyValueStore:
    """``redis(s)://`` -> ``RedisStore``; ``memory://`` -> a new ``MemoryStore``.

    Components that must share an in-memory store (``dev``) share one instance.
    """
    url = settings.kv_dsn
    scheme = _scheme(url)
    if scheme in ("redis", "rediss"):
        from core_base.adapters.kv_redis import RedisStore

        return RedisStore(url, prefix=settings.redis_key_prefix)
    if scheme == "memory":
        from core_base.adapters.kv_memory import MemoryStore

        return MemoryStore(prefix=settings.redis_key_prefix)
    raise _unsupported("REDIS_URL", scheme)


def create_database(settings: CoreSettings, *, unbounded_statements: bool = False) -> Database:
    """``postgresql://`` -> ``PostgresDatabase``; ``sqlite:///path`` -> ``SqliteDatabase``.

    ``unbounded_statements``: no command timeout on PostgreSQL, for migrations
    (an index built on a large table, a wait for another process's migration).
    """
    url = settings.database_dsn
    scheme = _scheme(url)
    if scheme in ("postgresql", "postgres"):
        from core_base.adapters.db_postgres import DEFAULT_COMMAND_TIMEOUT_S, PostgresDatabase

        timeout_s = None if unbounded_statements else DEFAULT_COMMAND_TIMEOUT_S
        return PostgresDatabase(
            url,
            command_timeout_s=timeout_s,
            login_setting=settings.named("database_url", "POSTGRES_USER, POSTGRES_PASSWORD"),
            database_setting=settings.named("database_url", "POSTGRES_DB"),
        )
    if scheme == "sqlite":
        from core_base.adapters.db_sqlite import MEMORY, SqliteDatabase

        path = url_path(url)
        if path.lstrip("/") == MEMORY:
            return SqliteDatabase(MEMORY)
        if not path:
            raise SettingsError("DATABASE_URL: sqlite:// needs a file path (sqlite:///path/app.db)")
        return SqliteDatabase(Path(path))
    raise _unsupported("DATABASE_URL", scheme)


def create_storage(settings: CoreSettings) -> ObjectStorage:
    """``s3://bucket`` -> ``S3Storage``; ``file:///path`` -> ``FileStorage``."""
    url = settings.storage_dsn
    scheme = _scheme(url)
    if scheme == "s3":
        from core_base.adapters.storage_s3 import S3Storage

        bucket = urlsplit(url).netloc
        if not bucket:
            raise SettingsError("STORAGE_URL: s3:// needs a bucket name (s3://my-bucket)")
        return S3Storage(
            bucket=bucket,
            endpoint_url=settings.s3_endpoint_url,
            public_url=settings.s3_public_url,
            region=settings.aws_region_name,
            access_key=_plain(settings.aws_access_key),
            secret_key=_plain(settings.aws_secret_key),
        )
    if scheme == "file":
        from core_base.adapters.storage_files import FileStorage, derive_signing_secret

        path = url_path(url)
        if not path:
            raise SettingsError("STORAGE_URL: file:// needs a directory (file:///var/lib/audio)")
        return FileStorage(
            Path(path),
            public_base_url=settings.s3_public_url or DEFAULT_FILES_BASE_URL,
            signing_secret=derive_signing_secret(settings.secret("internal_token")),
        )
    raise _unsupported("STORAGE_URL", scheme)


def url_path(url: str) -> str:
    """The file path of a ``sqlite:`` or ``file:`` URL.

    ``scheme:///abs/path`` (and SQLAlchemy's ``scheme:////abs/path``) is absolute;
    ``scheme://./rel/path`` or ``scheme://rel/path`` is relative to the working directory.
    """
    parts = urlsplit(url)
    path = unquote(parts.netloc + parts.path)
    if path.startswith("//"):
        path = path[1:]
    return path


def _scheme(url: str) -> str:
    try:
        return urlsplit(url).scheme
    except ValueError:
        return ""


def _unsupported(variable: str, scheme: str) -> SettingsError:
    return SettingsError(f"{variable}: unsupported URL scheme {scheme!r}")


def _plain(secret: SecretStr | None) -> str | None:
    """None for an unset or empty secret, so boto3 falls back to its own credential chain."""
    return secret.get_secret_value() or None if secret is not None else None
