"""Find the ``ryzanstein`` command lines that deploy files, the Procfile and the docs use.

Each is returned as a ``Use``: the file it came from and its argv (variables replaced by sample
values), or, for the docs, the subcommand and the flags named (docs write ``[--tp K]`` and the like).
"""

from __future__ import annotations

import configparser
import json
import re
import shlex
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

REPO = Path(__file__).resolve().parents[2]
DEPLOY = REPO / "deploy"

# What the placeholders of each file stand for when the command runs.
SAMPLE_VALUES = {
    "PORT": "5200",  # honcho's per-process port
    "HONCHO_PROCESS_NAME": "worker.1",
    "RYZ_MODEL": "echo",
    "RYZ_METRICS_PORT": "9100",
    "POD_NAME": "worker-0",  # Kubernetes $(POD_NAME)
    "%i": "9201",  # systemd instance name
    "%H": "host",  # systemd host name
    "$(hostname)": "host",
    "$$": "4242",
}


@dataclass(frozen=True)
class Use:
    where: str
    argv: list[str]  # argv[0] == "ryzanstein"


@dataclass(frozen=True)
class DocUse:
    where: str
    command: str
    flags: list[str]


def expand(text: str, env: dict[str, str] | None = None) -> str:
    """Replace shell/systemd/Kubernetes variables by sample values (``${X:-default}`` by the value or default)."""
    values = {**SAMPLE_VALUES, **(env or {})}
    for literal in ("$(hostname)", "$$", "%i", "%H"):
        text = text.replace(literal, values[literal])

    def var(match: re.Match[str]) -> str:
        name = match.group("name") or match.group("bare") or match.group("k8s")
        default = match.group("default")
        return values.get(name, default if default is not None else "")

    return re.sub(r"\$\{(?P<name>\w+)(?::-(?P<default>[^}]*))?\}|\$(?P<bare>[A-Za-z_]\w*)|\$\((?P<k8s>\w+)\)",
                  var, text)


def _ryzanstein_argv(argv: list[str]) -> list[str] | None:
    if argv and Path(argv[0]).name == "ryzanstein":
        return ["ryzanstein", *argv[1:]]
    return None


def procfile_uses() -> Iterator[Use]:
    for line in (REPO / "Procfile").read_text().splitlines():
        if line.strip() and not line.lstrip().startswith("#"):
            name, cmd = line.split(":", 1)
            words = shlex.split(expand(cmd))
            while words and (words[0] == "exec" or re.fullmatch(r"\w+=\S*", words[0])):
                words = words[1:]  # `VAR=value exec ryzanstein ...`: the command is what follows
            argv = _ryzanstein_argv(words)
            assert argv is not None, f"Procfile line {name!r} does not run ryzanstein"
            yield Use(f"Procfile:{name}", argv)


def dockerfile_instructions(path: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with line continuations joined and comments dropped."""
    out: list[tuple[str, str]] = []
    pending = ""
    for raw in path.read_text().splitlines():
        line = raw.strip()
        if not pending and (not line or line.startswith("#")):
            continue
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        line, pending = pending + line, ""
        keyword, _, rest = line.partition(" ")
        out.append((keyword.upper(), rest.strip()))
    return out


def _exec_or_shell(text: str) -> list[str]:
    return json.loads(text) if text.startswith("[") else shlex.split(text)


def dockerfile_uses(path: Path) -> Iterator[Use]:
    instructions = dockerfile_instructions(path)
    entrypoint = next(_exec_or_shell(a) for k, a in instructions if k == "ENTRYPOINT")
    env = {"RYZ_METRICS_PORT": "9100"}
    for keyword, rest in instructions:
        if keyword == "CMD":
            argv = _ryzanstein_argv([*entrypoint, *_exec_or_shell(rest)])
            assert argv is not None, f"{path.name}: CMD does not run ryzanstein"
            yield Use(f"{path.name}:CMD", argv)
        elif keyword == "HEALTHCHECK":
            cmd = rest.split(" CMD ", 1)[1]
            argv = _ryzanstein_argv(_exec_or_shell(expand(cmd, env)))
            assert argv is not None, f"{path.name}: HEALTHCHECK does not run ryzanstein"
            yield Use(f"{path.name}:HEALTHCHECK", argv)


def load_yaml_documents(path: Path) -> list[Any]:
    with path.open() as f:
        return [doc for doc in yaml.safe_load_all(f) if doc is not None]


def compose_uses() -> Iterator[Use]:
    (compose,) = load_yaml_documents(DEPLOY / "docker-compose.yml")
    for name, service in compose["services"].items():
        if not str(service.get("image", "")).startswith("ryzanstein"):
            continue
        yield Use(f"docker-compose.yml:{name}", ["ryzanstein", *service["command"]])
        test = service["healthcheck"]["test"]
        assert test[0] == "CMD", f"{name}: healthcheck should run a command"
        argv = _ryzanstein_argv(test[1:])
        assert argv is not None, f"{name}: healthcheck does not run ryzanstein"
        yield Use(f"docker-compose.yml:{name}:healthcheck", argv)


def k8s_workloads() -> Iterator[tuple[str, dict[str, Any]]]:
    for path in sorted((DEPLOY / "k8s").glob("*.yaml")):
        for doc in load_yaml_documents(path):
            if doc.get("kind") in ("Deployment", "StatefulSet"):
                yield f"k8s/{path.name}:{doc['metadata']['name']}", doc


def k8s_uses() -> Iterator[Use]:
    for where, doc in k8s_workloads():
        for container in doc["spec"]["template"]["spec"]["containers"]:
            if not container["image"].startswith("ryzanstein"):
                continue
            command = container.get("command", ["ryzanstein"])  # the images' ENTRYPOINT
            argv = _ryzanstein_argv([expand(a) for a in [*command, *container.get("args", [])]])
            assert argv is not None, f"{where}: container {container['name']} does not run ryzanstein"
            yield Use(f"{where}:{container['name']}", argv)


def systemd_env() -> dict[str, str]:
    env = {}
    for line in (DEPLOY / "systemd" / "ryzanstein.env").read_text().splitlines():
        if line.strip() and not line.startswith("#"):
            key, _, value = line.partition("=")
            env[key.strip()] = value.strip()
    return env


def systemd_unit(path: Path) -> configparser.ConfigParser:
    unit = configparser.ConfigParser(interpolation=None, strict=True)
    unit.optionxform = str  # type: ignore[assignment,method-assign]  # keys are case-sensitive
    unit.read(path)
    return unit


def systemd_uses() -> Iterator[Use]:
    env = systemd_env()
    for path in sorted((DEPLOY / "systemd").glob("*.service")):
        exec_start = systemd_unit(path)["Service"]["ExecStart"]
        argv = _ryzanstein_argv(shlex.split(expand(exec_start, env)))
        assert argv is not None, f"{path.name}: ExecStart does not run ryzanstein"
        yield Use(f"systemd/{path.name}", argv)


def deploy_uses() -> list[Use]:
    dockerfiles = [DEPLOY / "Dockerfile", DEPLOY / "Dockerfile.cuda"]
    return [*procfile_uses(), *(u for p in dockerfiles for u in dockerfile_uses(p)), *compose_uses(),
            *k8s_uses(), *systemd_uses()]


DOC_FILES = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md")), DEPLOY / "README.md"]
_CODE_SPAN = re.compile(r"`([^`\n]+)`")
# `ryzanstein cmd` or `.../bin/ryzanstein cmd`; not a path or a namespace (`kubectl -n ryzanstein exec`)
_COMMAND = re.compile(r"(?:^|[\s(=])(?<!-n )(?:[\w./-]*bin/)?ryzanstein\s+([a-z][a-z-]*)(?=\s|$)(.*)")
_FLAG = re.compile(r"(?<![\w-])(--[a-z][a-z0-9-]*)")


def _command_in(text: str) -> tuple[str, list[str]] | None:
    match = _COMMAND.search(text)
    if match is None:
        return None
    rest = re.split(r"\s(?:#|\||&&|;)\s?", match.group(2))[0]
    return match.group(1), _FLAG.findall(rest)


def doc_uses() -> Iterator[DocUse]:
    """``ryzanstein <cmd> --flags`` in fenced code blocks and in inline code of the docs."""
    for path in DOC_FILES:
        fenced = False
        for number, line in enumerate(path.read_text().splitlines(), 1):
            if line.lstrip().startswith("```"):
                fenced = not fenced
                continue
            where = f"{path.relative_to(REPO)}:{number}"
            texts = [line] if fenced else _CODE_SPAN.findall(line)
            for text in texts:
                found = _command_in(text)
                if found is not None:
                    yield DocUse(where, *found)
