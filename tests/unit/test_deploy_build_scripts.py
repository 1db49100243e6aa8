"""scripts/build_dockerfile.sh and scripts/push_image.sh, run for real against a
fake ``docker`` (and ``aws``) on a PATH of our making: the tags come from
version.json through jq, and a missing jq or version.json stops them clearly."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from tests.unit.deploy_support import (
    COMPOSE_FILE,
    REPO_ROOT,
    example_environment,
    interpolate,
    load_yaml,
    parse_env_example,
    without_extensions,
)

BASH = shutil.which("bash") or "/bin/bash"
SCRIPT_TIMEOUT_S = 60
# Records each call as its name and arguments, one per line, then a separator
# line. Only shell builtins: the PATH the scripts get holds nothing else.
FAKE_TOOL = """#!/bin/sh
printf '%s\\n' "${0##*/}" "$@" '@@' >> "$FAKE_LOG"
if [ "$1" = "login" ]; then while read -r _line; do :; done; fi
if [ "${0##*/}" = "aws" ]; then echo fake-password; fi
exit "${FAKE_EXIT:-0}"
"""


@dataclass
class Run:
    returncode: int
    stdout: str
    stderr: str
    calls: list[list[str]]


@dataclass
class Sandbox:
    """A copy of the scripts with a version.json of its own, and a bin dir that
    is the whole PATH the scripts see."""

    root: Path
    bin: Path
    log: Path

    def run(self, script: str, *args: str, env: dict[str, str] | None = None) -> Run:
        self.log.write_text("")
        completed = subprocess.run(
            [BASH, str(self.root / "scripts" / script), *args],
            env={"PATH": str(self.bin), "FAKE_LOG": str(self.log), "HOME": str(self.root)}
            | (env or {}),
            capture_output=True,
            text=True,
            timeout=SCRIPT_TIMEOUT_S,
            check=False,
        )
        return Run(completed.returncode, completed.stdout, completed.stderr, self.calls())

    def calls(self) -> list[list[str]]:
        calls: list[list[str]] = [[]]
        for line in self.log.read_text().splitlines():
            if line == "@@":
                calls.append([])
            else:
                calls[-1].append(line)
        return [call for call in calls if call]

    def write_version(self, content: dict[str, Any] | None) -> None:
        path = self.root / "version.json"
        if content is None:
            path.unlink(missing_ok=True)
        else:
            path.write_text(json.dumps(content))


def real_jq() -> str:
    jq = shutil.which("jq")
    assert jq, "jq is not installed; the build scripts need it (apt-get install -y jq)"
    return jq


@pytest.fixture
def sandbox(tmp_path: Path) -> Callable[..., Sandbox]:
    def make(*, jq: bool = True, tools: tuple[str, ...] = ("docker",)) -> Sandbox:
        root = tmp_path / "repo"
        (root / "scripts" / "lib").mkdir(parents=True)
        for script in ("build_dockerfile.sh", "push_image.sh", "lib/image.sh"):
            shutil.copy2(REPO_ROOT / "scripts" / script, root / "scripts" / script)
        bin_dir = tmp_path / "bin"
        bin_dir.mkdir()
        for tool in tools:
            fake = bin_dir / tool
            fake.write_text(FAKE_TOOL)
            fake.chmod(0o755)
        if jq:
            (bin_dir / "jq").symlink_to(real_jq())
        box = Sandbox(root=root, bin=bin_dir, log=tmp_path / "calls.log")
        box.write_version({"api_version": "9.8.7", "api_name": "AudioCraft"})
        return box

    return make


def option(call: list[str], name: str) -> list[str]:
    return [call[i + 1] for i, word in enumerate(call) if word == name]


# --- build_dockerfile.sh ---------------------------------------------------------------


def test_builds_both_targets_tagged_from_version_json(sandbox: Callable[..., Sandbox]) -> None:
    box = sandbox()
    run = box.run("build_dockerfile.sh", "registry.example.com/audiocraft")
    assert run.returncode == 0, run.stderr
    assert [call[:2] for call in run.calls] == [["docker", "build"], ["docker", "build"]]
    gpu, cpu = run.calls
    assert option(gpu, "--tag") == ["registry.example.com/audiocraft:audio_craft_9.8.7"]
    assert option(gpu, "--target") == ["gpu"]
    assert option(cpu, "--tag") == ["registry.example.com/audiocraft:audio_craft_9.8.7_cpu"]
    assert option(cpu, "--target") == ["cpu"]
    for call in run.calls:
        assert option(call, "--file") == [str(box.root / "dockerfile")]
        assert call[-1] == str(box.root), "the build context is the repository root"
    assert "image registry.example.com/audiocraft:audio_craft_9.8.7 is built" in run.stdout
    assert "image registry.example.com/audiocraft:audio_craft_9.8.7_cpu is built" in run.stdout


def test_registry_from_ecr_and_one_target(sandbox: Callable[..., Sandbox]) -> None:
    box = sandbox()
    ecr = "123456789012.dkr.ecr.eu-west-1.amazonaws.com/audiocraft"
    run = box.run("build_dockerfile.sh", env={"ECR": ecr, "TARGETS": "gpu"})
    assert run.returncode == 0, run.stderr
    assert len(run.calls) == 1
    assert option(run.calls[0], "--tag") == [f"{ecr}:audio_craft_9.8.7"]
    assert run.stdout.strip().endswith(f"image {ecr}:audio_craft_9.8.7 is built")


def test_extra_build_arguments_pass_through(sandbox: Callable[..., Sandbox]) -> None:
    box = sandbox()
    run = box.run(
        "build_dockerfile.sh", "reg/app", "--", "--build-arg", "CPU_EXTRAS=transformers",
        env={"TARGETS": "cpu"},
    )  # fmt: skip
    assert run.returncode == 0, run.stderr
    assert option(run.calls[0], "--build-arg") == ["CPU_EXTRAS=transformers"]


def test_without_a_registry_it_says_so(sandbox: Callable[..., Sandbox]) -> None:
    run = sandbox().run("build_dockerfile.sh")
    assert run.returncode != 0
    assert "ECR" in run.stderr and "registry" in run.stderr
    assert not run.calls


def test_without_jq_it_fails_clearly(sandbox: Callable[..., Sandbox]) -> None:
    box = sandbox(jq=False)
    assert not (box.bin / "jq").exists()
    run = box.run("build_dockerfile.sh", "reg/app")
    assert run.returncode != 0
    assert "jq is required" in run.stderr
    assert not run.calls, "docker ran without a version"


def test_without_version_json_it_fails_clearly(sandbox: Callable[..., Sandbox]) -> None:
    box = sandbox()
    box.write_version(None)
    run = box.run("build_dockerfile.sh", "reg/app")
    assert run.returncode != 0
    assert "version.json not found" in run.stderr
    assert not run.calls


@pytest.mark.parametrize("content", [{"api_name": "AudioCraft"}, {"api_version": ""}])
def test_a_version_json_without_api_version_fails_clearly(
    content: dict[str, Any], sandbox: Callable[..., Sandbox]
) -> None:
    box = sandbox()
    box.write_version(content)
    run = box.run("build_dockerfile.sh", "reg/app")
    assert run.returncode != 0
    assert "no api_version" in run.stderr
    assert not run.calls


def test_a_failed_build_stops_the_script(sandbox: Callable[..., Sandbox]) -> None:
    run = sandbox().run("build_dockerfile.sh", "reg/app", env={"FAKE_EXIT": "1"})
    assert run.returncode != 0
    assert "is built" not in run.stdout
    assert len(run.calls) == 1


def test_compose_pulls_the_images_the_script_builds(sandbox: Callable[..., Sandbox]) -> None:
    """With ECR and IMAGE_TAG as .env.example sets them, compose names exactly
    the images build_dockerfile.sh makes from the repository's version.json."""
    box = sandbox()
    shutil.copy2(REPO_ROOT / "version.json", box.root / "version.json")
    example = parse_env_example()
    run = box.run("build_dockerfile.sh", example.active["ECR"])
    assert run.returncode == 0, run.stderr
    built = {option(call, "--target")[0]: option(call, "--tag")[0] for call in run.calls}
    compose = without_extensions(interpolate(load_yaml(COMPOSE_FILE), example_environment(example)))
    for name, service in compose["services"].items():
        if "build" in service:
            assert service["image"] == built[service["build"]["target"]], name


# --- push_image.sh -----------------------------------------------------------------------


def test_push_logs_in_to_ecr_and_pushes_both_images(sandbox: Callable[..., Sandbox]) -> None:
    box = sandbox(tools=("docker", "aws"))
    ecr = "123456789012.dkr.ecr.eu-west-1.amazonaws.com/audiocraft"
    run = box.run("push_image.sh", ecr)
    assert run.returncode == 0, run.stderr
    # `aws ... | docker login ...` is a pipeline: both start at once, in no set order.
    assert ["aws", "ecr", "get-login-password", "--region", "eu-west-1"] in run.calls[:2]
    host = "123456789012.dkr.ecr.eu-west-1.amazonaws.com"
    logins = [call for call in run.calls if call[:2] == ["docker", "login"]]
    assert logins == [["docker", "login", "--username", "AWS", "--password-stdin", host]]
    pushes = [call[2] for call in run.calls if call[:2] == ["docker", "push"]]
    assert pushes == [f"{ecr}:audio_craft_9.8.7", f"{ecr}:audio_craft_9.8.7_cpu"]
    assert f"image {ecr}:audio_craft_9.8.7 is pushed" in run.stdout


def test_push_to_another_registry_uses_the_existing_login(sandbox: Callable[..., Sandbox]) -> None:
    box = sandbox()
    run = box.run("push_image.sh", env={"ECR": "registry.example.com/team/audiocraft"})
    assert run.returncode == 0, run.stderr
    assert [call[:2] for call in run.calls] == [["docker", "push"], ["docker", "push"]]
    assert "not Amazon ECR" in run.stdout


def test_push_refuses_a_name_without_a_registry(sandbox: Callable[..., Sandbox]) -> None:
    run = sandbox().run("push_image.sh", "audiocraft")
    assert run.returncode != 0
    assert "names no registry" in run.stderr
    assert not run.calls


def test_push_to_ecr_without_the_aws_cli_fails_clearly(sandbox: Callable[..., Sandbox]) -> None:
    run = sandbox().run("push_image.sh", "123456789012.dkr.ecr.us-east-1.amazonaws.com/x")
    assert run.returncode != 0
    assert "AWS CLI" in run.stderr
    assert not run.calls


def test_push_without_jq_fails_clearly(sandbox: Callable[..., Sandbox]) -> None:
    run = sandbox(jq=False).run("push_image.sh", "registry.example.com/audiocraft")
    assert run.returncode != 0
    assert "jq is required" in run.stderr
    assert not run.calls


def test_scripts_are_executable() -> None:
    for script in ("build_dockerfile.sh", "push_image.sh"):
        path = REPO_ROOT / "scripts" / script
        assert os.access(path, os.X_OK), f"chmod +x scripts/{script}"
        assert path.read_text(encoding="utf-8").startswith("#!/usr/bin/env bash\n")
