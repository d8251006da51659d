"""The Dockerfiles in images/ (no Docker engine here, so they are parsed, not built): base images pinned by
exact version tag or digest, a non-root USER in the final stage, ENTRYPOINT/CMD naming a console script of
pyproject's [project.scripts] (and arguments ``corral``'s parser accepts), COPY sources that exist, and the
Ray base image at the Ray version corral pins."""

from __future__ import annotations

import argparse
import json
import re
import tomllib
from dataclasses import dataclass, field
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
IMAGES = sorted((REPO / "images").glob("*.Dockerfile"))
PINNED_TAG = re.compile(r"^\d+\.\d+\.\d+[\w.-]*$")  # an exact release: major.minor.patch[-variant]
DIGEST = re.compile(r"@sha256:[0-9a-f]{64}$")


@dataclass
class Stage:
    base: str
    alias: str | None
    instructions: list[tuple[str, str]] = field(default_factory=list)

    def last(self, op: str) -> str | None:
        return next((arg for o, arg in reversed(self.instructions) if o == op), None)


def parse(path: Path) -> tuple[dict[str, str], list[Stage]]:
    """(ARG defaults before the first FROM, stages) of a Dockerfile."""
    text = re.sub(r"\\\n", " ", path.read_text())
    global_args: dict[str, str] = {}
    stages: list[Stage] = []
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        op, _, arg = line.partition(" ")
        op, arg = op.upper(), arg.strip()
        if op == "FROM":
            parts = arg.split()
            base = re.sub(r"\$\{?(\w+)\}?", lambda m: global_args.get(m.group(1), m.group(0)), parts[0])
            alias = parts[2] if len(parts) >= 3 and parts[1].upper() == "AS" else None
            stages.append(Stage(base, alias))
        elif not stages:
            assert op == "ARG", f"{path.name}: {op} before FROM"
            name, _, default = arg.partition("=")
            global_args[name] = default
        else:
            stages[-1].instructions.append((op, arg))
    return global_args, stages


def scripts() -> set[str]:
    return set(tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["scripts"])


def test_there_are_an_operator_and_a_ray_image() -> None:
    assert {p.name for p in IMAGES} == {"operator.Dockerfile", "ray.Dockerfile"}


@pytest.mark.parametrize("path", IMAGES, ids=lambda p: p.name)
def test_base_images_are_pinned(path: Path) -> None:
    _args, stages = parse(path)
    aliases = {s.alias for s in stages if s.alias}
    for s in stages:
        if s.base in aliases:
            continue
        assert "$" not in s.base, f"{path.name}: unresolved FROM {s.base}"
        if DIGEST.search(s.base):
            continue
        name, _, tag = s.base.rpartition(":")
        assert name and "/" not in tag, f"{path.name}: FROM {s.base} has no tag"
        assert PINNED_TAG.match(tag), f"{path.name}: FROM {s.base} is not pinned to an exact version"


@pytest.mark.parametrize("path", IMAGES, ids=lambda p: p.name)
def test_final_stage_runs_as_a_numeric_non_root_user(path: Path) -> None:
    _args, stages = parse(path)
    user = stages[-1].last("USER")
    assert user, f"{path.name}: no USER in the final stage"
    uid = user.split(":")[0]
    assert uid.isdigit() and int(uid) != 0, (
        f"{path.name}: USER {user} (runAsNonRoot needs a numeric non-0 uid)"
    )


@pytest.mark.parametrize("path", IMAGES, ids=lambda p: p.name)
def test_entrypoint_is_a_console_script(path: Path) -> None:
    _args, stages = parse(path)
    final = stages[-1]
    entry, cmd = final.last("ENTRYPOINT"), final.last("CMD")
    if path.name == "ray.Dockerfile":
        assert entry is None and cmd is None  # KubeRay supplies the command (ray start ...)
        return
    assert entry, f"{path.name}: no ENTRYPOINT"
    entry_argv, cmd_argv = json.loads(entry), json.loads(cmd or "[]")  # exec form only
    assert entry_argv[0] in scripts(), f"{path.name}: {entry_argv[0]} is not in [project.scripts]"
    from corral.operator import cli

    parser = argparse.ArgumentParser()
    cli.add_parser(parser.add_subparsers())
    ns = parser.parse_args([*entry_argv[1:], *cmd_argv])
    assert ns.all_namespaces and ns.liveness == "http://0.0.0.0:8080/healthz"


@pytest.mark.parametrize("path", IMAGES, ids=lambda p: p.name)
def test_copy_sources_exist_and_python_matches(path: Path) -> None:
    _args, stages = parse(path)
    for s in stages:
        for op, arg in s.instructions:
            if op == "COPY" and not arg.startswith("--from"):
                for src in arg.split()[:-1]:
                    assert (REPO / src).exists(), f"{path.name}: COPY {src}: no such path"
    requires = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["requires-python"]
    minimum = tuple(int(x) for x in requires.removeprefix(">=").split("."))
    for s in stages:
        m = re.search(r"(?:python:|-py)(\d)\.?(\d+)", s.base)
        if m:
            assert (int(m.group(1)), int(m.group(2))) >= minimum, f"{path.name}: {s.base} below {requires}"


def test_ray_base_is_the_pinned_ray_version() -> None:
    from corral.operator.translate import DEFAULT_RAY_VERSION

    pyproject = (REPO / "pyproject.toml").read_text()
    assert f'"ray[serve]=={DEFAULT_RAY_VERSION}"' in pyproject
    args, stages = parse(REPO / "images" / "ray.Dockerfile")
    assert args["RAY_IMAGE"].startswith(f"rayproject/ray:{DEFAULT_RAY_VERSION}-")
    assert stages[-1].base == args["RAY_IMAGE"]
    text = (REPO / "images" / "ray.Dockerfile").read_text()
    assert "ARG WITH_VLLM=false" in text and "[$extras]" in text
