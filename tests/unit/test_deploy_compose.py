"""docker-compose.yml and docker-compose.cpu.yml, read statically: valid Compose,
every variable from .env.example, every process wired to the settings it reads,
health-gated start-up, scalable workers, GPU only where it belongs."""

from __future__ import annotations

import argparse
import re
from typing import Any
from urllib.parse import urlsplit

import jsonschema
import pytest

from app_api.options import AppOptions
from core_base.generation.worker import DEFAULT_DRAIN_TIMEOUT_S
from core_base.http.server import GRACEFUL_SHUTDOWN_S
from core_base.services import all_service_specs
from tests.unit.deploy_support import (
    COMPOSE_CPU_FILE,
    COMPOSE_FILE,
    COMPOSE_ONLY_VARIABLES,
    THIRD_PARTY_VARIABLES,
    EnvExample,
    InterpolationError,
    env_names,
    environment_of,
    example_environment,
    interpolate,
    known_settings,
    load_schema,
    load_yaml,
    merge,
    parse_env_example,
    settings_class_for,
    strip_tags,
    variable_uses,
    without_extensions,
)

# The console script's subcommands (SPEC §1 and the CLI's module list).
CLI_COMMANDS: frozenset[tuple[str, ...]] = frozenset(
    {
        ("app-api",),
        ("audio-gen", "api"),
        ("audio-gen", "worker"),
        ("music-gen", "api"),
        ("music-gen", "worker"),
        ("dev",),
        ("migrate",),
        ("generate",),
        ("download-model",),
        ("build-tiny-model",),
    }
)
INFRASTRUCTURE = frozenset({"rabbitmq", "redis", "postgres", "minio"})
HEALTH_PATHS = ("/readyz", "/healthz")


@pytest.fixture(scope="module")
def example() -> EnvExample:
    return parse_env_example()


@pytest.fixture(scope="module")
def raw_compose() -> dict[str, Any]:
    return load_yaml(COMPOSE_FILE)


@pytest.fixture(scope="module")
def raw_cpu_override() -> dict[str, Any]:
    return load_yaml(COMPOSE_CPU_FILE)


@pytest.fixture(scope="module")
def compose(raw_compose: dict[str, Any], example: EnvExample) -> dict[str, Any]:
    """docker-compose.yml as Compose sees it with a .env filled in from the example."""
    document: dict[str, Any] = interpolate(raw_compose, example_environment(example))
    return without_extensions(document)


@pytest.fixture(scope="module")
def cpu_compose(
    raw_compose: dict[str, Any], raw_cpu_override: dict[str, Any], example: EnvExample
) -> dict[str, Any]:
    env = example_environment(example)
    merged: dict[str, Any] = merge(
        without_extensions(interpolate(raw_compose, env)),
        without_extensions(interpolate(raw_cpu_override, env)),
    )
    return merged


def app_services(compose: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """The services that run our image (``audiocraft-service <command>``)."""
    return {
        name: service
        for name, service in compose["services"].items()
        if service.get("build", {}).get("dockerfile") == "dockerfile"
    }


def long_running(compose: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {
        name: service
        for name, service in compose["services"].items()
        if str(service.get("restart", "no")) != "no"
    }


def command_of(service: dict[str, Any]) -> list[str]:
    command = service.get("command")
    assert isinstance(command, list) and command, "use the exec form: command: [...]"
    return [str(word) for word in command]


# --- the files are valid Compose ------------------------------------------------------


def test_compose_schema_is_available() -> None:
    schema = load_schema()
    assert "services" in schema["properties"]


@pytest.mark.parametrize("which", ["docker-compose.yml", "with docker-compose.cpu.yml"])
def test_compose_validates_against_the_compose_specification(
    which: str, compose: dict[str, Any], cpu_compose: dict[str, Any]
) -> None:
    document = compose if which == "docker-compose.yml" else cpu_compose
    validator = jsonschema.Draft7Validator(load_schema())
    errors = sorted(validator.iter_errors(document), key=lambda e: list(e.absolute_path))
    assert not errors, "\n".join(
        f"{'/'.join(map(str, e.absolute_path))}: {e.message}" for e in errors[:10]
    )


def test_the_cpu_override_alone_validates(
    raw_cpu_override: dict[str, Any], example: EnvExample
) -> None:
    override = without_extensions(interpolate(raw_cpu_override, example_environment(example)))
    validator = jsonschema.Draft7Validator(load_schema())
    errors = list(validator.iter_errors(strip_tags(override)))
    assert not errors, [e.message for e in errors]


def test_a_missing_required_secret_stops_compose(
    raw_compose: dict[str, Any], example: EnvExample
) -> None:
    env = example_environment(example)
    env["INTERNAL_TOKEN"] = ""
    with pytest.raises(InterpolationError, match="INTERNAL_TOKEN"):
        interpolate(raw_compose, env)


# --- variables: every one from .env.example, every one a real setting -------------------


@pytest.mark.parametrize("path", [COMPOSE_FILE, COMPOSE_CPU_FILE], ids=lambda p: p.name)
def test_every_variable_is_in_env_example_and_is_a_known_setting(
    path: Any, example: EnvExample
) -> None:
    used = {use.name for use in variable_uses(load_yaml(path))}
    assert used, f"{path.name} uses no variable"
    missing = used - set(example.active)
    assert not missing, f"{path.name} uses variables that .env.example does not set: {missing}"
    unknown = used - known_settings() - COMPOSE_ONLY_VARIABLES - THIRD_PARTY_VARIABLES
    assert not unknown, f"{path.name} uses variables no settings class reads: {unknown}"


def test_compose_only_variables_are_documented_as_such(example: EnvExample) -> None:
    for name in COMPOSE_ONLY_VARIABLES:
        assert name in example.active, name
        assert example.section_of[name].startswith("Deployment"), name
        assert name not in known_settings(), f"{name} is a setting now: drop it from the list"


def test_every_active_example_variable_is_used_by_compose(
    raw_compose: dict[str, Any], example: EnvExample
) -> None:
    used = {use.name for use in variable_uses(raw_compose)}
    unused = set(example.active) - used
    assert not unused, f".env.example sets variables docker-compose.yml ignores: {unused}"


def test_required_secrets_are_exactly_the_error_interpolated_ones(
    raw_compose: dict[str, Any], example: EnvExample
) -> None:
    guarded = {use.name for use in variable_uses(raw_compose) if use.operator == ":?"}
    assert guarded == example.required
    unguarded = {
        use.name
        for use in variable_uses(raw_compose)
        if use.name in example.required and use.operator != ":?"
    }
    assert not unguarded, f"required secrets used without ':?': {unguarded}"


def test_compose_managed_addresses_are_not_deployer_settings(
    raw_compose: dict[str, Any], example: EnvExample
) -> None:
    """A variable compose sets itself (``POSTGRES_HOST: postgres``) must not be set
    in .env.example, where a deployer would change it to no effect."""
    services = raw_compose["services"]
    for name in app_services(services_only(raw_compose)):
        for key, value in environment_of(services[name]).items():
            if value.startswith(("${" + key + "}", "${" + key + ":")):
                assert key in example.active, f"{name}: {key} comes from .env but is not set there"
            else:
                assert key not in example.active, (
                    f"{name}: {key} is fixed by compose ({value!r}) but .env.example sets it; "
                    "write it as '# {key}=...' there"
                )


def services_only(document: dict[str, Any]) -> dict[str, Any]:
    return {"services": document["services"]}


# --- each process gets what it needs, and nothing it cannot read --------------------------


def test_every_process_gets_every_deployer_setting_it_reads(
    compose: dict[str, Any], example: EnvExample
) -> None:
    for name, service in app_services(compose).items():
        cls = settings_class_for(command_of(service))
        passed = set(environment_of(service))
        expected = (env_names(cls) & set(example.active)) - COMPOSE_ONLY_VARIABLES
        missing = expected - passed
        assert not missing, f"{name} ({cls.__name__}) is not given {sorted(missing)}"
        foreign = passed - env_names(cls) - THIRD_PARTY_VARIABLES
        assert not foreign, f"{name} ({cls.__name__}) is given variables it never reads: {foreign}"


@pytest.mark.parametrize(
    ("role", "needed", "withheld"),
    [
        (
            ("app-api",),
            {"MARKETPLACE_TOKEN", "INTERNAL_TOKEN", "WEBHOOK_SECRET", "APP_API_PORT"},
            set(),
        ),
        (("api",), {"INTERNAL_TOKEN"}, {"MARKETPLACE_TOKEN", "WEBHOOK_SECRET"}),
        (
            ("worker",),
            {"INTERNAL_TOKEN", "CACHE_MODEL_DIR"},
            {"MARKETPLACE_TOKEN", "WEBHOOK_SECRET"},
        ),
    ],
)
def test_secrets_per_process(
    role: tuple[str, ...], needed: set[str], withheld: set[str], compose: dict[str, Any]
) -> None:
    infrastructure = {
        "POSTGRES_HOST", "POSTGRES_USER", "POSTGRES_PASSWORD", "POSTGRES_DB",
        "REDIS_HOST", "REDIS_PORT", "RABBITMQ_HOST", "RABBITMQ_USER", "RABBITMQ_PASS",
        "RABBITMQ_VHOST", "AWS_ACCESS_KEY", "AWS_SECRET_KEY", "S3_BUCKET", "S3_ENDPOINT_URL",
    }  # fmt: skip
    matched = [
        (name, service)
        for name, service in app_services(compose).items()
        if tuple(command_of(service)[-len(role) :]) == role
    ]
    assert matched, f"no service runs {role}"
    for name, service in matched:
        env = environment_of(service)
        missing = (needed | infrastructure) - {k for k, v in env.items() if v}
        assert not missing, f"{name} lacks {missing}"
        assert not withheld & set(env), f"{name} must not receive {withheld & set(env)}"


def test_generation_processes_get_their_own_service_settings(compose: dict[str, Any]) -> None:
    for spec in all_service_specs():
        for role in ("api", "worker"):
            name = f"{spec.cli_name}-{role}"
            assert name in compose["services"], f"no {name} service"
            service = compose["services"][name]
            assert command_of(service) == [spec.cli_name, role]
            env = environment_of(service)
            for suffix in ("PORT", "WORKER_PORT", "MODEL", "BACKEND"):
                assert env.get(f"{spec.env_prefix}{suffix}"), f"{name}: {spec.env_prefix}{suffix}"


def test_internal_addresses_name_real_services_and_ports(compose: dict[str, Any]) -> None:
    services = compose["services"]
    app_env = environment_of(services["app-api"])
    for spec in all_service_specs():
        url = urlsplit(app_env[f"{spec.env_prefix}API_URL"])
        api = f"{spec.cli_name}-api"
        assert url.hostname == api, f"{spec.env_prefix}API_URL must reach {api}"
        assert url.port == int(environment_of(services[api])[f"{spec.env_prefix}PORT"])
    callback = urlsplit(app_env["APP_API_URL"])
    assert callback.hostname == "app-api"
    assert callback.port == int(app_env["APP_API_PORT"])
    for name, service in app_services(compose).items():
        env = environment_of(service)
        assert env["POSTGRES_HOST"] == "postgres", name
        assert env["REDIS_HOST"] == "redis", name
        assert env["RABBITMQ_HOST"] == "rabbitmq", name
        assert urlsplit(env["S3_ENDPOINT_URL"]).hostname == "minio", name
    for name in ("postgres", "redis", "rabbitmq", "minio"):
        assert name in services


def test_infrastructure_uses_the_same_credentials_as_the_services(
    compose: dict[str, Any],
) -> None:
    services = compose["services"]
    app_env = environment_of(services["app-api"])
    postgres = environment_of(services["postgres"])
    assert postgres["POSTGRES_USER"] == app_env["POSTGRES_USER"]
    assert postgres["POSTGRES_PASSWORD"] == app_env["POSTGRES_PASSWORD"]
    assert postgres["POSTGRES_DB"] == app_env["POSTGRES_DB"]
    rabbit = environment_of(services["rabbitmq"])
    assert rabbit["RABBITMQ_DEFAULT_USER"] == app_env["RABBITMQ_USER"]
    assert rabbit["RABBITMQ_DEFAULT_PASS"] == app_env["RABBITMQ_PASS"]
    assert rabbit["RABBITMQ_DEFAULT_VHOST"] == app_env["RABBITMQ_VHOST"]
    minio = environment_of(services["minio"])
    assert minio["MINIO_ROOT_USER"] == app_env["AWS_ACCESS_KEY"]
    assert minio["MINIO_ROOT_PASSWORD"] == app_env["AWS_SECRET_KEY"]


def test_rabbitmq_is_a_recent_management_image(compose: dict[str, Any]) -> None:
    image = compose["services"]["rabbitmq"]["image"]
    repository, _, tag = image.partition(":")
    assert repository == "rabbitmq" and tag.endswith("-management"), image
    major, minor = (int(part) for part in tag.removesuffix("-management").split(".")[:2])
    assert (major, minor) >= (3, 13), f"{image}: quorum-queue features need 3.13+"


# --- commands ------------------------------------------------------------------------------


def test_every_command_is_a_cli_subcommand(compose: dict[str, Any]) -> None:
    for name, service in app_services(compose).items():
        command = command_of(service)
        assert any(tuple(command[: len(c)]) == c for c in CLI_COMMANDS), (
            f"{name}: {command} is not an audiocraft-service subcommand"
        )


def test_every_command_parses_with_the_real_cli(compose: dict[str, Any]) -> None:
    """Depends on the subcommand modules registered in ``core_base.cli``."""
    from core_base.cli import build_parser

    parser = build_parser()
    for name, service in app_services(compose).items():
        command = command_of(service)
        try:
            args = parser.parse_args(command)
        except SystemExit as exc:
            pytest.fail(f"{name}: `audiocraft-service {' '.join(command)}` is refused ({exc})")
        assert isinstance(args, argparse.Namespace)
        assert callable(getattr(args, "handler", None)), f"{name}: {command} has no handler"


def test_the_whole_stack_is_there(compose: dict[str, Any]) -> None:
    commands = {tuple(command_of(s)) for s in app_services(compose).values()}
    expected: set[tuple[str, ...]] = {("app-api",), ("migrate",)}
    for spec in all_service_specs():
        expected |= {(spec.cli_name, "api"), (spec.cli_name, "worker")}
    assert commands == expected
    assert set(compose["services"]) >= INFRASTRUCTURE


# --- health, order, restarts --------------------------------------------------------------


def test_every_long_running_service_has_a_healthcheck(compose: dict[str, Any]) -> None:
    running = long_running(compose)
    assert set(running) == set(compose["services"]) - {"migrate"}
    for name, service in running.items():
        check = service.get("healthcheck")
        assert check and not check.get("disable"), f"{name} has no healthcheck"
        test = check["test"]
        assert isinstance(test, list) and test[0] in ("CMD", "CMD-SHELL"), name
        for key in ("interval", "timeout", "retries", "start_period"):
            assert key in check, f"{name}: healthcheck.{key}"


def test_app_healthchecks_probe_the_port_the_process_listens_on(compose: dict[str, Any]) -> None:
    for name, service in app_services(compose).items():
        if name == "migrate":
            continue
        command = command_of(service)
        env = environment_of(service)
        if command == ["app-api"]:
            port = env["APP_API_PORT"]
        else:
            spec = next(s for s in all_service_specs() if s.cli_name == command[0])
            port = env[f"{spec.env_prefix}{'PORT' if command[1] == 'api' else 'WORKER_PORT'}"]
        test = service["healthcheck"]["test"]
        # python is in the image; curl and wget are not.
        assert test[:3] == ["CMD", "python", "-c"], f"{name}: {test}"
        assert any(f"http://127.0.0.1:{port}{path}" in test[3] for path in HEALTH_PATHS), (
            f"{name}: healthcheck does not probe port {port}: {test[3]}"
        )
        compile(test[3], f"{name}-healthcheck", "exec")


def test_start_order_is_health_gated(compose: dict[str, Any]) -> None:
    services = compose["services"]
    for name, service in services.items():
        for dependency, condition in (service.get("depends_on") or {}).items():
            assert dependency in services, f"{name} depends on unknown {dependency}"
            expected = (
                "service_completed_successfully" if dependency == "migrate" else "service_healthy"
            )
            assert condition == {"condition": expected}, f"{name} -> {dependency}: {condition}"
    for name in app_services(compose):
        if name == "migrate":
            assert {"postgres", "minio"} <= set(services[name]["depends_on"])
        else:
            assert "migrate" in services[name]["depends_on"], f"{name} starts before migrate"
            assert {"rabbitmq", "redis"} <= set(services[name]["depends_on"]), name


def test_grace_periods_outlast_the_processes_own_shutdown(compose: dict[str, Any]) -> None:
    """Killed before its own shutdown ends, a process drops requests in flight and
    skips its clean-up: the grace period must outlast the server's wait for requests
    and a worker's wait for its batch (the App API: and its own stop after the drain)."""
    for name, service in long_running(compose).items():
        if name not in app_services(compose):
            continue
        grace = service["stop_grace_period"]
        assert re.fullmatch(r"\d+s", grace), f"{name}: {grace}"
        worker = command_of(service)[-1] == "worker"
        needed = DEFAULT_DRAIN_TIMEOUT_S if worker else GRACEFUL_SHUTDOWN_S
        if command_of(service)[-1] == "app-api":  # then its own stop (grace, hand-backs)
            needed += AppOptions().stop_grace_s + AppOptions().stop_hand_back_s
        assert int(grace[:-1]) >= needed + 10, f"{name}: stop_grace_period {grace}"


def test_restart_policies(compose: dict[str, Any]) -> None:
    for name, service in compose["services"].items():
        expected = "no" if name == "migrate" else "unless-stopped"
        assert str(service.get("restart")) == expected, f"{name}: restart {service.get('restart')}"


# --- volumes, GPUs, scaling ------------------------------------------------------------------


def test_state_lives_in_named_volumes(compose: dict[str, Any]) -> None:
    declared = set(compose.get("volumes") or {})
    mounted: set[str] = set()
    for name, service in compose["services"].items():
        for volume in service.get("volumes") or []:
            source = volume.split(":")[0] if isinstance(volume, str) else volume["source"]
            assert source in declared, f"{name} mounts {source!r}, not a named volume"
            mounted.add(source)
    for name in ("postgres", "redis", "rabbitmq", "minio"):
        assert compose["services"][name].get("volumes"), f"{name} keeps its data in the container"
    assert mounted == declared, f"declared but unused volumes: {declared - mounted}"


def test_workers_mount_the_model_cache_at_cache_model_dir(compose: dict[str, Any]) -> None:
    for spec in all_service_specs():
        service = compose["services"][f"{spec.cli_name}-worker"]
        cache_dir = environment_of(service)["CACHE_MODEL_DIR"]
        assert f"model-cache:{cache_dir}" in service["volumes"]
        env = environment_of(service)
        for name in ("TRANSFORMERS_CACHE", "AUDIOCRAFT_CACHE_DIR", "HF_HOME"):
            assert env[name].startswith(cache_dir + "/"), f"{name} outside the model cache"


def test_gpu_workers_reserve_a_gpu_and_nothing_else_does(compose: dict[str, Any]) -> None:
    for name, service in compose["services"].items():
        devices = (
            (service.get("deploy") or {})
            .get("resources", {})
            .get("reservations", {})
            .get("devices")
        )
        if name.endswith("-worker"):
            assert devices, f"{name} reserves no GPU"
            assert any("gpu" in d.get("capabilities", []) for d in devices), name
            assert service["build"]["target"] == "gpu"
            assert not service["image"].endswith("_cpu")
        else:
            assert not devices, f"{name} reserves a GPU"


def test_the_cpu_override_runs_workers_on_cpu_with_synth(cpu_compose: dict[str, Any]) -> None:
    for spec in all_service_specs():
        name = f"{spec.cli_name}-worker"
        service = cpu_compose["services"][name]
        assert "deploy" not in service, f"{name} still reserves a GPU"
        assert service["build"]["target"] == "cpu" and service["image"].endswith("_cpu")
        assert environment_of(service)[f"{spec.env_prefix}BACKEND"] == "synth"
        # The rest of the worker is unchanged by the override.
        assert command_of(service) == [spec.cli_name, "worker"]
        assert environment_of(service)["INTERNAL_TOKEN"]
        assert service.get("healthcheck")


def test_workers_can_be_scaled(compose: dict[str, Any]) -> None:
    for name, service in compose["services"].items():
        if name.endswith("-worker"):
            assert "container_name" not in service, f"{name}: container_name blocks --scale"
            assert not service.get("ports"), f"{name}: a published port blocks --scale"


def test_only_the_app_api_and_s3_are_published_on_all_interfaces(compose: dict[str, Any]) -> None:
    for name, service in compose["services"].items():
        for port in service.get("ports") or []:
            public = not str(port).startswith("127.0.0.1:")
            assert not public or name in ("app-api", "minio"), f"{name} publishes {port}"
