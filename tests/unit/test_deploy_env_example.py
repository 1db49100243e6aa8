""".env.example: every SPEC §4 variable, the original defaults, secrets marked
REQUIRED and left empty, values the settings classes accept."""

from __future__ import annotations

import json

import pytest
from pydantic_settings import BaseSettings

from core_base.settings import AppSettings, Backend, CoreSettings
from tests.unit.deploy_support import (
    COMPOSE_ONLY_VARIABLES,
    THIRD_PARTY_VARIABLES,
    VERSION_JSON,
    EnvExample,
    env_names,
    example_environment,
    field_env_names,
    generation_settings_classes,
    known_settings,
    parse_env_example,
)

# SPEC §4, the contract: every variable it names.
SPEC_VARIABLES = frozenset(
    """
    APP_API_PORT AUDIO_GEN_PORT MUSIC_GEN_PORT MAX_DURATION MAX_PROMPT_LEN CACHE_MODEL_DIR
    TRANSFORMERS_CACHE AUDIOCRAFT_CACHE_DIR AUDIO_GEN_MODEL MUSIC_GEN_MODEL API_VERSION API_NAME
    POSTGRES_USER POSTGRES_PASSWORD POSTGRES_DB AWS_REGION_NAME AWS_ACCESS_KEY AWS_SECRET_KEY
    RABBITMQ_HOST RABBITMQ_VHOST RABBITMQ_USER RABBITMQ_PASS RABBITMQ_PORT RABBITMQ_UI_PORT
    REDIS_HOST REDIS_PORT REDIS_DB_NAME MARKETPLACE_TOKEN MARKETPLACE_CALLBACK
    POSTGRES_HOST POSTGRES_PORT S3_BUCKET S3_ENDPOINT_URL S3_PUBLIC_URL
    AUDIO_GEN_API_URL MUSIC_GEN_API_URL APP_API_URL ALLOW_PRIVATE_CALLBACKS
    AUDIO_GEN_WORKER_PORT MUSIC_GEN_WORKER_PORT INTERNAL_TOKEN WEBHOOK_SECRET
    PRESIGN_EXPIRES RESULT_TTL AUDIO_GEN_BACKEND MUSIC_GEN_BACKEND WORKER_BATCH_SIZE
    MAX_QUEUE_DEPTH BROKER_URL REDIS_URL DATABASE_URL STORAGE_URL
    """.split()
)
# The defaults SPEC §4 gives (the original deployment's).
SPEC_DEFAULTS = {
    "APP_API_PORT": "8007",
    "AUDIO_GEN_PORT": "8081",
    "MUSIC_GEN_PORT": "8082",
    "AUDIO_GEN_WORKER_PORT": "9081",
    "MUSIC_GEN_WORKER_PORT": "9082",
    "MAX_DURATION": "30",
    "MAX_PROMPT_LEN": "100",
    "AUDIO_GEN_MODEL": "facebook/audiogen-medium",
    "MUSIC_GEN_MODEL": "facebook/musicgen-small",
    "API_NAME": "AudioCraft",
    "RABBITMQ_PORT": "5672",
    "RABBITMQ_UI_PORT": "15672",
    "REDIS_PORT": "6379",
    "REDIS_DB_NAME": "0",
}
# The table's groups, in the original order, after the compose-only group.
SECTIONS = ["Deployment (compose only)", "AI service", "Database", "S3", "RabbitMQ", "Redis",
            "Marketplace"]  # fmt: skip
SECRETS_REQUIRED = frozenset(
    {"MARKETPLACE_TOKEN", "INTERNAL_TOKEN", "WEBHOOK_SECRET", "POSTGRES_PASSWORD",
     "AWS_ACCESS_KEY", "AWS_SECRET_KEY", "RABBITMQ_PASS"}
)  # fmt: skip


@pytest.fixture(scope="module")
def example() -> EnvExample:
    return parse_env_example()


def settings_classes() -> list[type[BaseSettings]]:
    return [CoreSettings, AppSettings, *generation_settings_classes().values()]


def test_every_spec_variable_is_there(example: EnvExample) -> None:
    missing = SPEC_VARIABLES - example.all_names
    assert not missing, f".env.example lacks {sorted(missing)}"


def test_every_variable_is_a_setting_or_compose_only(example: EnvExample) -> None:
    unknown = example.all_names - known_settings() - COMPOSE_ONLY_VARIABLES - THIRD_PARTY_VARIABLES
    assert not unknown, f".env.example names variables no settings class reads: {unknown}"


def test_every_setting_is_documented(example: EnvExample) -> None:
    """A deployer learns what can be set from .env.example."""
    undocumented = known_settings() - example.all_names
    assert not undocumented, f".env.example does not mention {sorted(undocumented)}"


def test_spec_defaults_are_kept(example: EnvExample) -> None:
    values = example.documented | example.active
    for name, default in SPEC_DEFAULTS.items():
        assert values[name] == default, f"{name}={values[name]}, the original default is {default}"


def test_spec_defaults_are_also_the_code_defaults() -> None:
    """The example and the settings classes agree, so that a missing .env line
    means the same as the example's value."""
    for name, default in SPEC_DEFAULTS.items():
        classes = [cls for cls in settings_classes() if name in env_names(cls)]
        assert classes, f"no settings class reads {name}"
        field = _field_for(classes[-1], name)
        value = classes[-1].model_fields[field].default
        assert str(value).removesuffix(".0") == default, f"{name}: code default {value!r}"


def _field_for(cls: type[BaseSettings], variable: str) -> str:
    for field, info in cls.model_fields.items():
        if variable in field_env_names(field, info):
            return field
    raise AssertionError(f"{cls.__name__} has no field for {variable}")


def test_groups_follow_the_original_table(example: EnvExample) -> None:
    assert example.sections == SECTIONS
    groups = {
        "AI service": {"APP_API_PORT", "AUDIO_GEN_MODEL", "MAX_DURATION", "CACHE_MODEL_DIR"},
        "Database": {"POSTGRES_USER", "POSTGRES_PASSWORD", "POSTGRES_DB", "POSTGRES_HOST"},
        "S3": {"AWS_ACCESS_KEY", "AWS_SECRET_KEY", "S3_BUCKET", "S3_PUBLIC_URL"},
        "RabbitMQ": {"RABBITMQ_USER", "RABBITMQ_PASS", "RABBITMQ_HOST", "RABBITMQ_UI_PORT"},
        "Redis": {"REDIS_HOST", "REDIS_PORT", "REDIS_DB_NAME"},
        "Marketplace": {"MARKETPLACE_TOKEN", "MARKETPLACE_CALLBACK", "WEBHOOK_SECRET"},
    }
    for section, names in groups.items():
        for name in names:
            assert example.section_of[name] == section, f"{name} is not under {section}"


def test_secrets_are_required_and_empty(example: EnvExample) -> None:
    assert example.required == SECRETS_REQUIRED
    for name in example.required:
        assert example.active[name] == "", f"{name} has a value in the example"
        assert len(example.comments[name]) > len("REQUIRED"), f"{name}: say what it is"


def test_no_secret_setting_has_a_value(example: EnvExample) -> None:
    secrets: set[str] = set()
    for cls in settings_classes():
        for field, info in cls.model_fields.items():
            if "SecretStr" in repr(info.annotation):
                secrets |= field_env_names(field, info)
    assert "MARKETPLACE_TOKEN" in secrets  # the check sees the secret fields
    for name in secrets:
        assert not example.active.get(name), f"{name} is a secret: leave it empty in the example"


def test_the_example_values_are_accepted_by_every_settings_class(
    example: EnvExample, monkeypatch: pytest.MonkeyPatch
) -> None:
    env = example_environment(example)
    for name, value in env.items():
        if value:  # compose passes an empty optional value on; the classes see it unset
            monkeypatch.setenv(name, value)
        else:
            monkeypatch.delenv(name, raising=False)
    for cls in settings_classes():
        settings = cls(_env_file=None)
        assert settings.model_dump()


def test_backends_are_valid_choices(example: EnvExample) -> None:
    for name in ("AUDIO_GEN_BACKEND", "MUSIC_GEN_BACKEND"):
        assert example.active[name] in {backend.value for backend in Backend}


def test_the_model_licence_is_stated_next_to_the_models(example: EnvExample) -> None:
    for name in ("AUDIO_GEN_MODEL", "MUSIC_GEN_MODEL", "CACHE_MODEL_DIR"):
        assert example.section_of[name] == "AI service"
    text = " ".join(example.comments[name] for name in ("CACHE_MODEL_DIR",))
    assert "CC-BY-NC 4.0" in text and "NON-COMMERCIAL" in text.upper()


def test_the_image_tag_is_the_release_version(example: EnvExample) -> None:
    version = json.loads(VERSION_JSON.read_text(encoding="utf-8"))["api_version"]
    assert example.active["IMAGE_TAG"] == version, "bump IMAGE_TAG with version.json"


def test_rabbitmq_user_is_not_guest(example: EnvExample) -> None:
    # guest may only log in from localhost; the services connect over the network.
    assert example.active["RABBITMQ_USER"] != "guest"
