"""Readers for the deployment files under infra/ that tests/test_infra.py checks: Kubernetes objects,
the Dockerfiles' instructions, and command lines parsed (never run) against the real `towerline` CLI."""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import typer
import yaml

from towerline.cli import app

ROOT = Path(__file__).resolve().parents[1]
INFRA = ROOT / "infra"
DOCKER = INFRA / "docker"


def k8s_objects() -> list[dict[str, Any]]:
    """Every object of infra/k8s/*.yaml, each with the file it came from under `_file`."""
    objects = []
    for path in sorted((INFRA / "k8s").glob("*.yaml")):
        for document in yaml.safe_load_all(path.read_text()):
            if document:
                objects.append({**document, "_file": path.name})
    return objects


def find(objects: list[dict[str, Any]], kind: str, name: str) -> dict[str, Any]:
    matches = [o for o in objects if o["kind"] == kind and o["metadata"]["name"] == name]
    assert len(matches) == 1, f"expected one {kind}/{name}, found {len(matches)}"
    return matches[0]


def pod_templates(objects: list[dict[str, Any]]) -> Iterator[tuple[str, dict[str, Any]]]:
    """(owner, pod template) of every Deployment, Job and CronJob."""
    for obj in objects:
        owner = f"{obj['kind']}/{obj['metadata']['name']}"
        if obj["kind"] in ("Deployment", "Job"):
            yield owner, obj["spec"]["template"]
        elif obj["kind"] == "CronJob":
            yield owner, obj["spec"]["jobTemplate"]["spec"]["template"]


def containers(pod: dict[str, Any]) -> list[dict[str, Any]]:
    return [*pod["spec"].get("initContainers", []), *pod["spec"]["containers"]]


def dockerfile_instructions(path: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) in order, continuation lines joined, comments dropped."""
    joined = re.sub(r"\\\n\s*", " ", "\n".join(
        line for line in path.read_text().splitlines() if not line.lstrip().startswith("#")))
    instructions = []
    for line in joined.splitlines():
        if line.strip():
            keyword, _, rest = line.strip().partition(" ")
            instructions.append((keyword.upper(), rest.strip()))
    return instructions


def final_stage(path: Path) -> list[tuple[str, str]]:
    instructions = dockerfile_instructions(path)
    last_from = max(i for i, (keyword, _) in enumerate(instructions) if keyword == "FROM")
    return instructions[last_from:]


def entrypoint(path: Path) -> list[str]:
    (arguments,) = [rest for keyword, rest in final_stage(path) if keyword == "ENTRYPOINT"]
    return json.loads(arguments)


def parse_towerline(argv: list[str]) -> Any:
    """Parse `towerline ARGV` as the CLI would, without running it: an unknown command or option, or
    a missing argument, raises the CLI's usage error. (Typer carries its own copy of click, so the
    command classes are reached through the app rather than imported.)"""
    command = typer.main.get_command(app)
    words = list(argv)
    while hasattr(command, "get_command"):
        name = words.pop(0)
        found = command.get_command(command.context_class(command), name)
        assert found is not None, f"towerline has no command {name!r} (in {argv})"
        command = found
    return command.make_context(command.name or "towerline", words)
