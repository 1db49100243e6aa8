"""Static readers for the deployment files: compose (with interpolation and
override merging), ``.env.example``, the dockerfile, and the settings classes.

Nothing here talks to Docker: this machine has only the client, and CI may have
none. The tests read the files the way Compose and Docker would.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from pydantic import AliasChoices
from pydantic.fields import FieldInfo
from pydantic_settings import BaseSettings

from core_base.settings import LIBRARY_VARIABLES, AppSettings, CoreSettings

REPO_ROOT = Path(__file__).resolve().parents[2]
COMPOSE_FILE = REPO_ROOT / "docker-compose.yml"
COMPOSE_CPU_FILE = REPO_ROOT / "docker-compose.cpu.yml"
ENV_EXAMPLE = REPO_ROOT / ".env.example"
DOCKERFILE = REPO_ROOT / "dockerfile"
DOCKERIGNORE = REPO_ROOT / ".dockerignore"
VERSION_JSON = REPO_ROOT / "version.json"
# The Compose Specification's schema, shared by the project, read in place.
COMPOSE_SCHEMA = REPO_ROOT.parent / "shared" / "schemas" / "compose-spec.json"

# Variables of .env.example that configure compose itself, not a process.
COMPOSE_ONLY_VARIABLES = frozenset({"ECR", "IMAGE_TAG", "MINIO_PORT", "MINIO_CONSOLE_PORT"})
# Variables passed to containers that belong to third-party libraries (the hub
# client's, torch's; our model loading reads HF_HUB_OFFLINE too).
THIRD_PARTY_VARIABLES = frozenset(LIBRARY_VARIABLES)


# --- compose ---------------------------------------------------------------------


@dataclass(frozen=True)
class Reset:
    """Compose's ``!reset``: the key is removed from the merged model."""

    value: Any


@dataclass(frozen=True)
class Override:
    """Compose's ``!override``: the value replaces instead of merging."""

    value: Any


class ComposeLoader(yaml.SafeLoader):  # type: ignore[misc]  # yaml ships no stubs here
    """A safe loader that knows Compose's merge tags."""


def _construct_reset(loader: yaml.SafeLoader, node: yaml.Node) -> Reset:
    return Reset(_construct_any(loader, node))


def _construct_override(loader: yaml.SafeLoader, node: yaml.Node) -> Override:
    return Override(_construct_any(loader, node))


def _construct_any(loader: yaml.SafeLoader, node: yaml.Node) -> Any:
    if isinstance(node, yaml.MappingNode):
        return loader.construct_mapping(node, deep=True)
    if isinstance(node, yaml.SequenceNode):
        return loader.construct_sequence(node, deep=True)
    return (
        loader.construct_scalar(node) if isinstance(node, yaml.ScalarNode) and node.value else None
    )


ComposeLoader.add_constructor("!reset", _construct_reset)
ComposeLoader.add_constructor("!override", _construct_override)


def load_yaml(path: Path) -> dict[str, Any]:
    assert path.is_file(), f"{path} is missing"
    data = yaml.load(path.read_text(encoding="utf-8"), Loader=ComposeLoader)
    assert isinstance(data, dict), f"{path}: top level is not a mapping"
    return data


_VARIABLE = re.compile(
    r"""\$(?:
        (?P<escaped>\$) |
        \{(?P<braced>[A-Za-z_][A-Za-z0-9_]*)(?:(?P<op>:?[-?])(?P<arg>[^}]*))?\} |
        (?P<plain>[A-Za-z_][A-Za-z0-9_]*) |
        (?P<invalid>)
    )""",
    re.VERBOSE,
)


class InterpolationError(AssertionError):
    """A ``${VAR}`` that Compose would refuse or leave empty."""


def interpolate_text(text: str, env: Mapping[str, str]) -> str:
    """Substitute like Compose: ``$$``, ``$VAR``, ``${VAR}``, ``${VAR:-d}``,
    ``${VAR-d}``, ``${VAR:?err}``, ``${VAR?err}``. An unset variable without a
    default is an error here (Compose would warn and use an empty string)."""

    def substitute(match: re.Match[str]) -> str:
        if match.group("escaped") is not None:
            return "$"
        if match.group("invalid") is not None:
            raise InterpolationError(f"invalid interpolation in {text!r}")
        name = match.group("braced") or match.group("plain")
        op, arg = match.group("op"), match.group("arg") or ""
        value = env.get(name)
        if op in (":-", "-"):
            if value is None or (op == ":-" and value == ""):
                return interpolate_text(arg, env)
            return value
        if op in (":?", "?"):
            if value is None or (op == ":?" and value == ""):
                raise InterpolationError(f"{name}: {arg or 'required'}")
            return value
        if value is None:
            raise InterpolationError(f"{name} is not set (used in {text!r})")
        return value

    return _VARIABLE.sub(substitute, text)


def interpolate(node: Any, env: Mapping[str, str]) -> Any:
    """Interpolate every string of a loaded compose document."""
    if isinstance(node, str):
        return interpolate_text(node, env)
    if isinstance(node, dict):
        return {key: interpolate(value, env) for key, value in node.items()}
    if isinstance(node, list):
        return [interpolate(value, env) for value in node]
    if isinstance(node, Reset):
        return Reset(interpolate(node.value, env))
    if isinstance(node, Override):
        return Override(interpolate(node.value, env))
    return node


@dataclass(frozen=True)
class VariableUse:
    name: str
    operator: str | None  # None, ":-", "-", ":?", "?"


def variable_uses(node: Any) -> list[VariableUse]:
    """Every ``${VAR}`` / ``$VAR`` in a loaded compose document (``$$`` excluded)."""
    uses: list[VariableUse] = []
    for text in _strings(node):
        for match in _VARIABLE.finditer(text):
            name = match.group("braced") or match.group("plain")
            if name:
                uses.append(VariableUse(name, match.group("op")))
                uses.extend(variable_uses(match.group("arg") or ""))
    return uses


def _strings(node: Any) -> Iterable[str]:
    if isinstance(node, str):
        yield node
    elif isinstance(node, dict):
        for key, value in node.items():
            yield from _strings(key)
            yield from _strings(value)
    elif isinstance(node, list):
        for value in node:
            yield from _strings(value)
    elif isinstance(node, Reset | Override):
        yield from _strings(node.value)


def merge(base: Any, override: Any) -> Any:
    """Compose's merge of an override file, enough for our files: mappings merge
    key by key, ``!reset`` removes, ``!override`` and scalars replace, and the
    sequences Compose merges by value (``ports``, ``volumes``...) are appended."""
    if isinstance(override, Override):
        return override.value
    if isinstance(base, dict) and isinstance(override, dict):
        merged = dict(base)
        for key, value in override.items():
            if isinstance(value, Reset):
                merged.pop(key, None)
            elif key in merged:
                merged[key] = merge(merged[key], value)
            else:
                merged[key] = strip_tags(value)
        return merged
    if isinstance(base, list) and isinstance(override, list):
        return base + [item for item in override if item not in base]
    return strip_tags(override)


def strip_tags(node: Any) -> Any:
    if isinstance(node, Override):
        return strip_tags(node.value)
    if isinstance(node, dict):
        return {k: strip_tags(v) for k, v in node.items() if not isinstance(v, Reset)}
    if isinstance(node, list):
        return [strip_tags(v) for v in node]
    return node


def without_extensions(document: Mapping[str, Any]) -> dict[str, Any]:
    """Top-level ``x-`` keys are anchors for YAML; Compose ignores them."""
    return {key: value for key, value in document.items() if not key.startswith("x-")}


def load_schema() -> dict[str, Any]:
    assert COMPOSE_SCHEMA.is_file(), (
        f"the Compose Specification schema is missing: expected {COMPOSE_SCHEMA} "
        "(shared/schemas/compose-spec.json next to the repository)"
    )
    schema = json.loads(COMPOSE_SCHEMA.read_text(encoding="utf-8"))
    assert isinstance(schema, dict)
    return schema


def environment_of(service: Mapping[str, Any]) -> dict[str, str]:
    """A service's ``environment`` as a mapping, whichever form it is written in."""
    raw = service.get("environment") or {}
    if isinstance(raw, list):
        pairs = (str(item).partition("=") for item in raw)
        return {key: value for key, _, value in pairs}
    return {str(key): "" if value is None else str(value) for key, value in raw.items()}


# --- .env.example -------------------------------------------------------------------

_ASSIGNMENT = re.compile(r"^(?P<comment>#\s*)?(?P<name>[A-Z][A-Z0-9_]*)=(?P<value>.*)$")


@dataclass
class EnvExample:
    """``NAME=value`` lines (active), ``# NAME=value`` lines (documented only),
    the variables whose comment block says REQUIRED, and each one's comments."""

    active: dict[str, str] = field(default_factory=dict)
    documented: dict[str, str] = field(default_factory=dict)
    required: set[str] = field(default_factory=set)
    comments: dict[str, str] = field(default_factory=dict)
    sections: list[str] = field(default_factory=list)
    section_of: dict[str, str] = field(default_factory=dict)

    @property
    def all_names(self) -> set[str]:
        return set(self.active) | set(self.documented)


_SECTION = re.compile(r"^#\s*=+\s*(?P<title>[^=]+?)\s*=+\s*$")


def parse_env_example(path: Path = ENV_EXAMPLE) -> EnvExample:
    assert path.is_file(), f"{path} is missing"
    example = EnvExample()
    comment_block: list[str] = []
    after_assignment = False
    section = ""
    for raw_line in path.read_text(encoding="utf-8").splitlines():
        line = raw_line.strip()
        if not line:
            comment_block, after_assignment = [], False
            continue
        if heading := _SECTION.match(line):
            section = heading.group("title")
            example.sections.append(section)
            comment_block, after_assignment = [], False
            continue
        assignment = _ASSIGNMENT.match(line)
        if assignment is None:
            assert line.startswith("#"), f".env.example: cannot read line {raw_line!r}"
            if after_assignment:  # a comment after a variable starts the next block
                comment_block, after_assignment = [], False
            comment_block.append(line.lstrip("#").strip())
            continue
        name, value = assignment.group("name"), assignment.group("value")
        assert name not in example.all_names, f".env.example: {name} appears twice"
        is_documented = assignment.group("comment") is not None
        (example.documented if is_documented else example.active)[name] = value
        # Consecutive "# NAME=value" lines share the comment above them.
        example.comments[name] = " ".join(comment_block)
        example.section_of[name] = section
        if not is_documented and "REQUIRED" in example.comments[name]:
            example.required.add(name)
        if not is_documented:
            comment_block = []
        after_assignment = True
    return example


def example_environment(example: EnvExample, secret: str = "example-secret-123") -> dict[str, str]:
    """The active values, with a stand-in for each REQUIRED (empty) one, as a
    deployer's filled-in .env would be."""
    env = dict(example.active)
    for name in example.required:
        env[name] = secret
    return env


# --- settings -------------------------------------------------------------------------


def field_env_names(name: str, info: FieldInfo) -> set[str]:
    """The environment variables one settings field reads (its name or aliases)."""
    alias = info.validation_alias
    if isinstance(alias, AliasChoices):
        return {str(choice).upper() for choice in alias.choices}
    if isinstance(alias, str):
        return {alias.upper()}
    return {name.upper()}


def env_names(cls: type[BaseSettings]) -> set[str]:
    """Every environment variable a settings class reads (field names and aliases)."""
    names: set[str] = set()
    for name, info in cls.model_fields.items():
        names |= field_env_names(name, info)
    return names


def generation_settings_classes() -> dict[str, type[BaseSettings]]:
    """The settings class of each generation service, by CLI name."""
    from core_base.services import all_service_specs

    return {spec.cli_name: spec.settings_class for spec in all_service_specs()}


def settings_class_for(command: list[str]) -> type[BaseSettings]:
    """Which settings a process started with ``audiocraft-service <command>`` reads."""
    if command[0] == "app-api":
        return AppSettings
    generation = generation_settings_classes()
    if command[0] in generation:
        return generation[command[0]]
    return CoreSettings


def known_settings() -> set[str]:
    names = env_names(CoreSettings) | env_names(AppSettings)
    for cls in generation_settings_classes().values():
        names |= env_names(cls)
    return names


# --- dockerfile -------------------------------------------------------------------------


@dataclass(frozen=True)
class Instruction:
    keyword: str
    arguments: str
    stage: str


def parse_dockerfile(path: Path = DOCKERFILE) -> list[Instruction]:
    """Instructions with continuation lines joined and comments dropped, each
    tagged with the name of its build stage."""
    assert path.is_file(), f"{path} is missing"
    instructions: list[Instruction] = []
    stage = ""
    pending = ""
    for raw_line in path.read_text(encoding="utf-8").splitlines():
        line = raw_line.strip()
        if not line or line.startswith("#"):
            continue
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        line, pending = pending + line, ""
        keyword, _, arguments = line.partition(" ")
        keyword = keyword.upper()
        if keyword == "FROM":
            words = arguments.split()
            stage = words[2] if len(words) >= 3 and words[1].upper() == "AS" else words[0]
        instructions.append(Instruction(keyword, arguments.strip(), stage))
    return instructions


def stage_names(instructions: list[Instruction]) -> list[str]:
    return [i.stage for i in instructions if i.keyword == "FROM"]


def stage_parents(instructions: list[Instruction]) -> dict[str, str]:
    return {i.stage: i.arguments.split()[0] for i in instructions if i.keyword == "FROM"}


def stage_lineage(instructions: list[Instruction], stage: str) -> list[str]:
    """The stage and the stages it is built FROM, nearest first."""
    parents = stage_parents(instructions)
    lineage = [stage]
    while parents.get(lineage[-1]) in parents:
        lineage.append(parents[lineage[-1]])
    return lineage


def exec_form(arguments: str) -> list[str]:
    value = json.loads(arguments)
    assert isinstance(value, list) and all(isinstance(v, str) for v in value), arguments
    return value
