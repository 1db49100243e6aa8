"""The dockerfile, read statically: cpu and gpu targets, a real entry point,
non-root, no secrets, sources that exist, and a .dockerignore that keeps .env out."""

from __future__ import annotations

import importlib
import re
import shlex
import shutil
import subprocess
import sys
import tomllib
import zipfile
from fnmatch import fnmatch
from pathlib import Path

import pytest

from core_base.services import SERVICE_SPECS
from tests.unit.deploy_support import (
    DOCKERFILE,
    DOCKERIGNORE,
    REPO_ROOT,
    Instruction,
    exec_form,
    parse_dockerfile,
    parse_env_example,
    stage_lineage,
    stage_names,
)

TARGETS = ("cpu", "gpu")
SECRET_WORDS = ("TOKEN", "SECRET", "PASS", "KEY", "CREDENTIAL")


@pytest.fixture(scope="module")
def instructions() -> list[Instruction]:
    return parse_dockerfile(DOCKERFILE)


def in_lineage(instructions: list[Instruction], target: str) -> list[Instruction]:
    """The instructions that make up a target: its stage and the stages it is FROM."""
    lineage = set(stage_lineage(instructions, target))
    return [i for i in instructions if i.stage in lineage]


def last(instructions: list[Instruction], keyword: str) -> Instruction:
    found = [i for i in instructions if i.keyword == keyword]
    assert found, f"no {keyword}"
    return found[-1]


def copied_from_stage(instructions: list[Instruction], target: str) -> list[str]:
    """The build stages whose output a target copies (COPY --from=...)."""
    stages = []
    for instruction in in_lineage(instructions, target):
        if instruction.keyword == "COPY" and (
            m := re.search(r"--from=(\S+)", instruction.arguments)
        ):
            stages.append(m.group(1))
    return stages


def run_text(
    instructions: list[Instruction], target: str, keywords: frozenset[str] = frozenset({"RUN"})
) -> str:
    """Every RUN (or other ``keywords``) of a target and of the stages it copies
    from, in order."""
    stages = set(stage_lineage(instructions, target))
    for source in copied_from_stage(instructions, target):
        stages |= set(stage_lineage(instructions, source))
    return "\n".join(
        i.arguments for i in instructions if i.keyword in keywords and i.stage in stages
    )


def test_both_targets_exist_and_a_plain_build_gives_the_small_one(
    instructions: list[Instruction],
) -> None:
    names = stage_names(instructions)
    for target in TARGETS:
        assert target in names, f"no '{target}' target"
    assert names[-1] == "cpu", "the last stage is what `docker build .` gives: keep it small"
    assert instructions[0].keyword in ("ARG", "FROM")


@pytest.mark.parametrize("target", TARGETS)
def test_entry_point_is_the_console_script(target: str, instructions: list[Instruction]) -> None:
    entrypoint = exec_form(last(in_lineage(instructions, target), "ENTRYPOINT").arguments)
    assert entrypoint == ["audiocraft-service"]
    scripts = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text(encoding="utf-8"))["project"][
        "scripts"
    ]
    assert entrypoint[0] in scripts, "the entry point is not a console script of pyproject"
    module_name, _, function = scripts[entrypoint[0]].partition(":")
    assert callable(getattr(importlib.import_module(module_name), function))
    exec_form(last(in_lineage(instructions, target), "CMD").arguments)


@pytest.mark.parametrize("target", TARGETS)
def test_runs_as_a_non_root_user(target: str, instructions: list[Instruction]) -> None:
    user = last(in_lineage(instructions, target), "USER").arguments.split(":")[0]
    assert user not in ("root", "0"), f"{target} runs as root"
    created = "\n".join(i.arguments for i in in_lineage(instructions, target) if i.keyword == "RUN")
    assert re.search(rf"useradd\b.*\b{re.escape(user)}\b", created), f"user {user} is never created"


def test_the_gpu_target_installs_cuda_torch_before_the_model_extras(
    instructions: list[Instruction],
) -> None:
    text = run_text(instructions, "gpu")
    torch = re.search(r"pip install --index-url \S+ \S*torch==", text)
    assert torch, "the gpu target does not install torch from an index of its own"
    arguments = {i.arguments for i in instructions if i.keyword == "ARG"}
    index = next(a for a in arguments if a.startswith("TORCH_INDEX_URL="))
    assert re.search(r"download\.pytorch\.org/whl/cu\d+", index), index
    extras = text.find('".[transformers]"')
    audiocraft = text.find("scripts/install_audiocraft.sh")
    assert 0 <= torch.start() < extras < audiocraft, "torch, then .[transformers], then audiocraft"


def test_the_gpu_target_does_not_pin_what_the_extras_require_otherwise(
    instructions: list[Instruction],
) -> None:
    """The model extras' own requirements (pyproject.toml) must be installable as
    they are: an extra pin on the same package in the image can only conflict."""
    text = run_text(instructions, "gpu", frozenset({"RUN", "ARG", "ENV"}))
    extras = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())["project"][
        "optional-dependencies"
    ]["transformers"]
    for requirement in extras:
        name = re.split(r"[<>=!~\[ ]", requirement, maxsplit=1)[0]
        assert not re.search(rf'"{re.escape(name)}\s*[<>=!~]', text, re.IGNORECASE), (
            f"the gpu target pins {name} beside the extra's {requirement!r}"
        )


def test_the_cpu_target_stays_small(instructions: list[Instruction]) -> None:
    text = run_text(instructions, "cpu")
    assert "/whl/cu" not in text and "install_audiocraft" not in text
    # torch only when asked for (CPU_EXTRAS), and then the CPU wheel.
    for line in text.splitlines():
        if "torch" in line and "pip install" in line:
            assert "whl/cpu" in line, line
    assert 'ARG CPU_EXTRAS=""' in {f"ARG {i.arguments}" for i in instructions}


def test_copied_sources_exist(instructions: list[Instruction]) -> None:
    ignored = dockerignore_patterns()
    for instruction in instructions:
        if instruction.keyword != "COPY" or "--from=" in instruction.arguments:
            continue
        words = [w for w in shlex.split(instruction.arguments) if not w.startswith("--")]
        for source in words[:-1]:
            if "*" in source:
                continue  # a glob may match nothing when other sources match
            assert (REPO_ROOT / source).exists(), f"COPY {source}: not in the repository"
            assert not any(fnmatch(source, p) for p in ignored), f"COPY {source}: .dockerignore'd"


def test_scripts_run_in_the_build_exist(instructions: list[Instruction]) -> None:
    for instruction in instructions:
        if instruction.keyword == "RUN":
            for script in re.findall(r"scripts/[\w.-]+", instruction.arguments):
                assert (REPO_ROOT / script).is_file(), f"RUN uses {script}, which is missing"


def test_each_build_runs_the_installed_cli(instructions: list[Instruction]) -> None:
    for target in TARGETS:
        assert "audiocraft-service --help" in run_text(instructions, target), target


def test_no_build_step_runs_python_on_the_sources_beside_it(
    instructions: list[Instruction],
) -> None:
    """`python -c` in the build context (WORKDIR /src, the sources copied there)
    imports those sources, not the installed packages: a path read from a module
    then points into /src (a `cp version.json` onto itself failed the build)."""
    for instruction in instructions:
        if instruction.keyword == "RUN":
            assert not re.search(r"\bpython3?\s+(-\w+\s+)*-c\b", instruction.arguments), (
                f"RUN runs python -c in the build context: {instruction.arguments[:80]}"
            )


def test_no_secret_is_baked_in(instructions: list[Instruction]) -> None:
    for instruction in instructions:
        if instruction.keyword in ("ENV", "ARG"):
            for name in re.findall(r"([A-Za-z_][A-Za-z0-9_]*)=", instruction.arguments):
                assert not any(word in name.upper() for word in SECRET_WORDS), (
                    f"{instruction.keyword} {name}: secrets come from the environment at run time"
                )
        if instruction.keyword == "COPY":
            assert ".env" not in shlex.split(instruction.arguments), "COPY .env"
            assert not re.match(r"^(--\S+\s+)*\.\s", instruction.arguments), (
                "COPY . copies the whole context"
            )


def dockerignore_patterns() -> list[str]:
    assert DOCKERIGNORE.is_file(), ".dockerignore is missing"
    lines = DOCKERIGNORE.read_text(encoding="utf-8").splitlines()
    return [line.strip() for line in lines if line.strip() and not line.startswith("#")]


def test_dockerignore_keeps_secrets_and_clutter_out() -> None:
    patterns = dockerignore_patterns()
    for required in (".env", ".env.*", ".git", ".venv", "tests", "**/__pycache__"):
        assert required in patterns, f".dockerignore lacks {required}"


def test_the_model_cache_dir_is_prepared_for_the_app_user(instructions: list[Instruction]) -> None:
    cache_dir = parse_env_example().active["CACHE_MODEL_DIR"]
    env = " ".join(i.arguments for i in instructions if i.keyword == "ENV")
    assert f"CACHE_MODEL_DIR={cache_dir}" in env
    runs = " ".join(i.arguments for i in instructions if i.keyword == "RUN")
    assert re.search(rf"mkdir -p {re.escape(cache_dir)}\b", runs)
    assert re.search(rf"chown -R app:app {re.escape(cache_dir)}\b", runs)


def test_what_the_build_copies_makes_a_wheel_of_every_package_without_deprecations(
    instructions: list[Instruction], tmp_path: Path
) -> None:
    """``pip install .`` in the image, from only what the build stage copies: the
    build warns of nothing its setuptools will refuse later (the license table did,
    dated), and the wheel holds every package of the sources (subpackages too)."""
    source = tmp_path / "src"
    source.mkdir()
    for instruction in in_lineage(instructions, "build-common"):
        if instruction.keyword != "COPY" or "--from=" in instruction.arguments:
            continue
        words = [w for w in shlex.split(instruction.arguments) if not w.startswith("--")]
        for pattern in words[:-1]:
            for path in REPO_ROOT.glob(pattern):
                target = source / path.relative_to(REPO_ROOT)
                if path.is_dir():
                    shutil.copytree(path, target, ignore=shutil.ignore_patterns("__pycache__"))
                else:
                    shutil.copy2(path, target)
    wheel_command = [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation"]
    built = subprocess.run(
        [*wheel_command, "--wheel-dir", str(tmp_path / "dist"), str(source)],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    output = built.stdout + built.stderr
    assert built.returncode == 0, output
    assert "deprecat" not in output.lower(), output
    (wheel,) = (tmp_path / "dist").glob("*.whl")
    with zipfile.ZipFile(wheel) as archive:
        in_wheel = set(archive.namelist())
    # From the repository, not from what was copied: a package the build does not
    # copy (or pyproject does not include) is missing from the wheel.
    packages = {
        init.relative_to(REPO_ROOT).as_posix()
        for top in top_level_packages()
        for init in (REPO_ROOT / top).rglob("__init__.py")
        if "__pycache__" not in init.parts
    }
    assert "app_api/repository/__init__.py" in packages  # a subpackage is among them
    assert packages <= in_wheel, sorted(packages - in_wheel)


def top_level_packages() -> list[str]:
    """The service's packages: the framework, the App API and every registered
    generation service (a new one is a line in core_base/services.py)."""
    services = sorted({path.split(".")[0] for path in SERVICE_SPECS.values()})
    return ["core_base", "app_api", *services]


def test_mypy_checks_every_package() -> None:
    with (REPO_ROOT / "pyproject.toml").open("rb") as file:
        checked = tomllib.load(file)["tool"]["mypy"]["packages"]
    assert set(top_level_packages()) <= set(checked)
