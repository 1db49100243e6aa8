"""Settings from the environment and ``.env`` (pydantic-settings).

Names and defaults are those of the original deployment (SPEC §4). Settings own
URL building: the full URLs (``BROKER_URL``, ``REDIS_URL``, ``DATABASE_URL``,
``STORAGE_URL``) override the parts, and their scheme selects the adapter.
A bad value stops start-up with one line naming the variable
(:func:`load_settings`); secrets are ``SecretStr`` and never show in ``repr``.
"""

from __future__ import annotations

import ipaddress
import logging
import os
import re
from enum import StrEnum
from functools import cache
from pathlib import Path
from typing import Annotated, Any, TypeVar
from urllib.parse import quote, urlsplit

from pydantic import (
    AfterValidator,
    AliasChoices,
    Field,
    SecretStr,
    ValidationError,
    create_model,
    model_validator,
)
from pydantic_settings import BaseSettings, SettingsConfigDict

from core_base.constants import (
    DEFAULT_KEY_PREFIX,
    DEFAULT_PRESIGN_EXPIRES_S,
    DEFAULT_RESULT_TTL_S,
)
from core_base.contracts import BearerHttpUrl, HttpUrl
from core_base.errors import SettingsError
from core_base.log_format import log_format_name
from core_base.version import api_version

logger = logging.getLogger(__name__)

# Shorter secrets (tokens, the webhook secret) are logged as easy to guess.
MIN_SECRET_LEN = 16

BROKER_SCHEMES = frozenset({"amqp", "amqps", "memory"})
KV_SCHEMES = frozenset({"redis", "rediss", "memory"})
DATABASE_SCHEMES = frozenset({"postgresql", "postgres", "sqlite"})
STORAGE_SCHEMES = frozenset({"s3", "file"})
# S3's rules for a new bucket's name (MinIO's are the same): 3 to 63 lowercase
# letters, digits, dots and hyphens, a letter or digit at each end, no "..", not
# an IP address. Refused here, a bad name would only surface at the first request,
# as a botocore validation traceback or a 400 from the store.
_BUCKET_NAME = re.compile(r"[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]")


LOG_LEVELS = ("CRITICAL", "ERROR", "WARNING", "INFO", "DEBUG")


def log_level_name(value: str) -> str:
    """A logging level's name, any case; WARN is WARNING."""
    name = value.strip().upper()
    name = "WARNING" if name == "WARN" else name
    if name not in LOG_LEVELS:
        raise ValueError(f"must be one of {', '.join(LOG_LEVELS)}")
    return name


LogLevel = Annotated[str, AfterValidator(log_level_name)]
LogFormat = Annotated[str, AfterValidator(log_format_name)]


class Backend(StrEnum):
    """Generation backends (SPEC §5)."""

    SYNTH = "synth"
    TRANSFORMERS = "transformers"
    AUDIOCRAFT = "audiocraft"


_SETTINGS_CONFIG = SettingsConfigDict(
    env_file=".env",
    env_file_encoding="utf-8",
    extra="ignore",
    case_sensitive=False,
    populate_by_name=True,
    # Compose passes "VAR=" from .env as an empty string: treat it as unset.
    env_ignore_empty=True,
)


# Variables the model libraries read themselves (huggingface_hub, torch), from the
# process environment only, some as they are imported.
LIBRARY_VARIABLES = (
    "HF_HUB_OFFLINE",
    "HF_HOME",
    "HF_HUB_CACHE",
    "HF_ENDPOINT",
    "HF_TOKEN",
    "TORCH_HOME",
)


def export_library_variables(env_file: Path = Path(".env")) -> list[str]:
    """Put the :data:`LIBRARY_VARIABLES` that ``env_file`` sets into the process
    environment, so that ``.env`` configures the libraries as it configures the
    services (``HF_HUB_OFFLINE=true`` there kept a process off the hub only under
    compose, which passes it on). As for every setting, the environment wins, and
    an empty value is no value. Call before the libraries are imported; returns
    the names exported."""
    from dotenv import dotenv_values

    if not env_file.is_file():
        return []
    try:
        values = dotenv_values(env_file, encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise SettingsError(
            f"{env_file}: not UTF-8 text (byte {exc.start}: {exc.object[exc.start]:#04x});"
            " save it as UTF-8"
        ) from None
    exported = []
    for name in LIBRARY_VARIABLES:
        value = values.get(name)
        if value and not os.environ.get(name):
            os.environ[name] = value
            exported.append(name)
    return exported


class LoggingSettings(BaseSettings):
    """What the console script reads before any command's settings: how to log."""

    model_config = _SETTINGS_CONFIG

    log_level: LogLevel = "INFO"
    log_format: LogFormat = "text"


class CoreSettings(BaseSettings):
    """What every process needs: infrastructure, limits, shared secrets."""

    model_config = _SETTINGS_CONFIG

    api_name: str = "AudioCraft"
    api_version: str = Field(default_factory=api_version)
    log_level: LogLevel = "INFO"
    # "json": one JSON object a log line (core_base.log_format), for collectors.
    log_format: LogFormat = "text"
    # One line per HTTP request ("client - "METHOD path HTTP/1.1" status") from the
    # App API and the sub-service APIs, at INFO; off by default (it costs CPU on
    # every call). Worker health ports never log their probes.
    access_log: bool = False

    # Limits of the marketplace input.
    max_duration: float = Field(30.0, gt=0, le=600)
    max_prompt_len: int = Field(100, ge=1, le=2000)

    # Model caches.
    cache_model_dir: Path = Path("./models")
    transformers_cache: Path | None = None
    audiocraft_cache_dir: Path | None = None

    # PostgreSQL.
    postgres_user: str = "postgres"
    postgres_password: SecretStr = SecretStr("")
    postgres_db: str = "postgres"
    postgres_host: str = "localhost"
    postgres_port: int = Field(5432, ge=1, le=65535)
    database_url: SecretStr | None = None

    # S3.
    aws_region_name: str = "us-east-1"
    aws_access_key: SecretStr | None = None
    aws_secret_key: SecretStr | None = None
    s3_bucket: str = "audiocraft"
    s3_endpoint_url: HttpUrl | None = None
    s3_public_url: HttpUrl | None = None
    storage_url: str | None = None
    presign_expires: int = Field(DEFAULT_PRESIGN_EXPIRES_S, ge=1, le=7 * 24 * 3600)

    # RabbitMQ.
    rabbitmq_host: str = "localhost"
    rabbitmq_vhost: str = "/"
    rabbitmq_user: str = "guest"
    rabbitmq_pass: SecretStr = SecretStr("guest")
    rabbitmq_port: int = Field(5672, ge=1, le=65535)
    rabbitmq_ui_port: int = Field(15672, ge=1, le=65535)
    broker_url: SecretStr | None = None
    # Prepended to queue names; lets tests and staging share one vhost.
    queue_prefix: str = ""
    amqp_heartbeat_s: int = Field(30, ge=1, le=600)

    # Redis.
    redis_host: str = "localhost"
    redis_port: int = Field(6379, ge=1, le=65535)
    redis_db_name: int = Field(0, ge=0, le=15)
    redis_url: SecretStr | None = None
    redis_key_prefix: str = DEFAULT_KEY_PREFIX
    result_ttl: int = Field(DEFAULT_RESULT_TTL_S, ge=60)

    # Service-to-service auth (sub-service APIs, callbacks). Required by every
    # API and worker; see :meth:`require`.
    internal_token: SecretStr | None = None

    # Workers.
    worker_batch_size: int = Field(4, ge=1, le=64)
    # How long a worker waits for batch-mates after the first task arrives.
    worker_batch_window_ms: int = Field(50, ge=0, le=10_000)
    # Whether tasks with a seed may share a batch on the model backends. Off: each
    # runs alone, so that the same seed always gives the same audio (SPEC §3);
    # batched float rounding can flip a sampled token in a long generation.
    worker_batch_seeded: bool = False
    max_queue_depth: int = Field(1000, ge=1)
    # Synth only: emulated cost of one decoding step (50 steps per audio second),
    # so benchmarks and tests can stand in for a slow model. 0 = as fast as it runs.
    synth_step_delay_ms: float = Field(0.0, ge=0, le=10_000)

    @model_validator(mode="after")
    def _check_urls(self) -> CoreSettings:
        # A bad resolved URL is blamed on the full URL when set, else on the one part
        # that can break it (numbers are checked as numbers, names and passwords are
        # quoted into it; a host or bucket is not: ``db:5432``).
        _check_url(self.named("broker_url", "RABBITMQ_HOST"), self.broker_dsn, BROKER_SCHEMES)
        _check_url(self.named("redis_url", "REDIS_HOST"), self.kv_dsn, KV_SCHEMES)
        _check_url(self.named("database_url", "POSTGRES_HOST"), self.database_dsn, DATABASE_SCHEMES)
        storage = self.named("storage_url", "S3_BUCKET")
        _check_url(storage, self.storage_dsn, STORAGE_SCHEMES)
        if urlsplit(self.storage_dsn).scheme == "s3":
            _check_bucket_name(storage, self.storage_dsn)
        return self

    def named(self, url_field: str, parts: str) -> str:
        """What a message about a resolved URL's value names: the full URL's variable
        when it is set (it replaces the parts), else ``parts``, the variables the
        value came from (``"POSTGRES_USER, POSTGRES_PASSWORD"``)."""
        return url_field.upper() if getattr(self, url_field) is not None else parts

    # --- resolved URLs (secrets inside: never log them) -----------------------
    @property
    def broker_dsn(self) -> str:
        if self.broker_url is not None:
            return self.broker_url.get_secret_value()
        vhost = quote(self.rabbitmq_vhost, safe="")
        return (
            f"amqp://{quote(self.rabbitmq_user, safe='')}:"
            f"{quote(self.rabbitmq_pass.get_secret_value(), safe='')}@"
            f"{self.rabbitmq_host}:{self.rabbitmq_port}/{vhost}"
        )

    @property
    def kv_dsn(self) -> str:
        if self.redis_url is not None:
            return self.redis_url.get_secret_value()
        return f"redis://{self.redis_host}:{self.redis_port}/{self.redis_db_name}"

    @property
    def database_dsn(self) -> str:
        if self.database_url is not None:
            return self.database_url.get_secret_value()
        password = self.postgres_password.get_secret_value()
        auth = quote(self.postgres_user, safe="")
        if password:
            auth += ":" + quote(password, safe="")
        return f"postgresql://{auth}@{self.postgres_host}:{self.postgres_port}/{self.postgres_db}"

    @property
    def storage_dsn(self) -> str:
        return self.storage_url or f"s3://{self.s3_bucket}"

    def require(self, *fields: str) -> None:
        """Refuse to start when a setting this process needs is unset."""
        for name in fields:
            value = getattr(self, name)
            if value is None or (isinstance(value, SecretStr) and not value.get_secret_value()):
                raise SettingsError(f"{name.upper()}: required but not set")

    def warn_about_short_secrets(self, *fields: str) -> list[str]:
        """Log (and return) the variables among ``fields`` whose secret, or one of
        whose comma-separated tokens, is short enough to guess."""
        short = []
        for name in fields:
            value = getattr(self, name)
            plain = value.get_secret_value() if isinstance(value, SecretStr) else ""
            tokens = [token.strip() for token in plain.split(",") if token.strip()]
            if any(len(token) < MIN_SECRET_LEN for token in tokens):
                short.append(name.upper())
                logger.warning(
                    "%s: shorter than %d characters, easy to guess; generate one with"
                    " `openssl rand -hex 32`",
                    name.upper(),
                    MIN_SECRET_LEN,
                )
        return short

    def secret(self, name: str) -> str:
        """The plain value of a required secret setting."""
        self.require(name)
        value = getattr(self, name)
        return value.get_secret_value() if isinstance(value, SecretStr) else str(value)


class AppSettings(CoreSettings):
    """The App API (marketplace-facing)."""

    app_api_port: int = Field(8007, ge=1, le=65535)
    app_api_url: BearerHttpUrl = "http://localhost:8007"
    marketplace_token: SecretStr | None = None
    marketplace_callback: HttpUrl | None = None
    webhook_secret: SecretStr | None = None
    allow_private_callbacks: bool = False
    audio_gen_api_url: BearerHttpUrl = "http://localhost:8081"
    music_gen_api_url: BearerHttpUrl = "http://localhost:8082"
    # Finished workflows older than this are deleted with their audio; 0 keeps all.
    retention_days: float = Field(0, ge=0)

    @property
    def marketplace_tokens(self) -> list[str]:
        """Valid marketplace tokens; a comma-separated list allows rotation."""
        if self.marketplace_token is None:
            return []
        raw = self.marketplace_token.get_secret_value()
        return [token.strip() for token in raw.split(",") if token.strip()]


class GenerationSettings(CoreSettings):
    """A generation service (API + worker). Subclassed per service with its own
    env prefix by :func:`generation_settings_class` (``AUDIO_GEN_PORT`` ...)."""

    port: int = Field(8080, ge=1, le=65535)
    worker_port: int = Field(9080, ge=1, le=65535)
    model: str = ""
    backend: Backend = Backend.SYNTH

    # The service's fields are read from the environment by their prefixed names
    # only: by-name population would also read a bare PORT, MODEL or BACKEND
    # (hosting platforms set PORT) into every service. Keyword arguments still go
    # by field name, translated in __init__.
    model_config = SettingsConfigDict(**{**_SETTINGS_CONFIG, "populate_by_name": False})

    def __init__(self, **values: Any) -> None:
        aliases = {
            name: str(field.validation_alias.choices[0])
            for name, field in type(self).model_fields.items()
            if isinstance(field.validation_alias, AliasChoices)
        }
        super().__init__(**{aliases.get(key, key): value for key, value in values.items()})


@cache
def generation_settings_class(
    env_prefix: str, default_port: int, default_worker_port: int, default_model: str
) -> type[GenerationSettings]:
    """A ``GenerationSettings`` whose service fields read ``<PREFIX>_PORT`` etc."""

    def field(name: str, default: Any) -> Any:
        # The base field's type and rules (a port's range, a URL's check), its
        # default and environment name made for this service.
        base = GenerationSettings.model_fields[name]
        rules = base.metadata
        return (
            Annotated[base.annotation, *rules] if rules else base.annotation,
            Field(default, validation_alias=AliasChoices(f"{env_prefix}{name.upper()}")),
        )

    return create_model(
        f"{env_prefix.title().replace('_', '')}Settings",
        __base__=GenerationSettings,
        port=field("port", default_port),
        worker_port=field("worker_port", default_worker_port),
        model=field("model", default_model),
        backend=field("backend", Backend.SYNTH),
    )


S = TypeVar("S", bound=BaseSettings)


def load_settings(cls: type[S], **overrides: Any) -> S:
    """Build settings, turning a validation error into one line naming the variable."""
    try:
        return cls(**overrides)
    except ValidationError as exc:
        raise SettingsError(describe_validation_error(cls, exc)) from None


def describe_validation_error(cls: type[BaseSettings], exc: ValidationError) -> str:
    first = exc.errors()[0]
    message = str(first.get("msg", "invalid value")).removeprefix("Value error, ")
    loc = first.get("loc")
    if not loc:  # a model-level check; its message names the variable itself
        return message
    name = str(loc[0])
    field = cls.model_fields.get(name)
    alias = getattr(field, "validation_alias", None) if field else None
    if isinstance(alias, AliasChoices):
        name = str(alias.choices[0])
    value = first.get("input")
    shown = "" if isinstance(value, dict) or _looks_secret(name) else f" (got {value!r})"
    return f"{name.upper()}: {message}{shown}"


def _looks_secret(name: str) -> bool:
    lowered = name.lower()
    return any(word in lowered for word in ("token", "secret", "pass", "key", "url"))


def _check_url(variable: str, url: str, schemes: frozenset[str]) -> None:
    """Refuse a URL that does not parse, whose port is no port, or whose scheme picks
    no adapter: each client library (yarl, asyncpg, redis-py) would fail later, with
    a traceback. The messages never quote the URL, which may hold a password."""
    try:
        parts = urlsplit(url)
    except ValueError:  # an unclosed or invalid [IPv6] host
        raise ValueError(
            f"{variable}: not a valid URL (its host does not parse; an IPv6 address goes"
            " in [brackets])"
        ) from None
    if parts.scheme not in schemes:
        allowed = ", ".join(sorted(f"{s}://" for s in schemes))
        raise ValueError(
            f"{variable}: unsupported URL scheme {parts.scheme!r}; use one of {allowed}"
        )
    try:
        port_ok = parts.port != 0  # None: no port, the client's default
    except ValueError:  # not a number, or past 65535
        port_ok = False
    if not port_ok:
        raise ValueError(f"{variable}: the port after the host must be a number from 1 to 65535")


def _check_bucket_name(variable: str, url: str) -> None:
    """Refuse an ``s3://bucket`` whose bucket S3 would not accept."""
    bucket = urlsplit(url).netloc
    if "@" in url:  # s3://KEY:SECRET@bucket, as some tools take: not repeated here
        raise ValueError(
            f"{variable}: credentials do not belong in the URL (it names the bucket only);"
            " set AWS_ACCESS_KEY and AWS_SECRET_KEY"
        )
    if _BUCKET_NAME.fullmatch(bucket) and ".." not in bucket and not _is_ip_address(bucket):
        return
    raise ValueError(
        f"{variable}: {bucket!r} is not a valid S3 bucket name (3 to 63 lowercase letters,"
        " digits, dots and hyphens, starting and ending with a letter or digit)"
    )


def _is_ip_address(name: str) -> bool:
    try:
        ipaddress.ip_address(name)
    except ValueError:
        return False
    return True
