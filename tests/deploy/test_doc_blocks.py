"""Every shell block of README.md, docs/ and deploy/README.md that can run here, run: against a stack
of this test's own (embedded Redis, a balancer, an echo worker group, the gateway), with the docs'
example URLs replaced by the stack's. Each command must exit as the docs show it (0, unless its
documented output reports a failure); commands that need what this machine lacks (Docker, kubectl,
systemd, GPUs, a network) or that start a server the stack already stands for are listed with the
reason they were not run. The flags of every documented ``ryzanstein`` command are checked against
``--help`` in test_commands.py either way."""

from __future__ import annotations

import os
import re
import shlex
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import redis

from broker.embedded import EmbeddedRedis, free_port
from broker.keys import Keys
from tests.deploy.commands import DOC_FILES, REPO
from tests.integration.conftest import wait_for, wait_groups

pytestmark = pytest.mark.integration

DOC_URL = "redis://127.0.0.1:51993"  # the URL the docs' examples print
DOC_GATEWAY = "http://127.0.0.1:8000"
BLOCK = re.compile(r"^(?P<indent>[ \t]*)```(?P<lang>sh|console|bash|shell)\n(?P<body>.*?)^(?P=indent)```",
                   re.MULTILINE | re.DOTALL)

# The first word(s) of commands that cannot run here, and why.
NOT_HERE = {
    "make": "runs the whole suite or a benchmark (minutes)",
    "docker": "no Docker daemon on the test machine (tests/deploy/test_compose_up.py tries it)",
    "kubectl": "no Kubernetes cluster (manifests are validated by test_k8s_schema.py)",
    "sudo": "installs system-wide (systemd units are checked by test_files.py)",
    "torchrun": "needs GPUs on two hosts",
    "honcho": "starts the whole Procfile (tests/integration/test_procfile.py runs it)",
    "node": "needs Node.js and the example file",
    "python plain.py": "needs the example file from the docs",
    "export": "sets the environment for an external Redis",
    ".": "activates a virtual environment (the test runs in one)",
    "mkdir": "copies a model from a path on the reader's machine",
    "ryzanstein up": "starts a stack: the test's own stands for it",
    "ryzanstein broker": "starts a Redis server: the test's own stands for it",
    "ryzanstein balancer": "starts a balancer: the test's own stands for it",
    "ryzanstein worker": "starts a worker group: the test's own stands for it",
    "ryzanstein gateway": "starts a gateway: the test's own stands for it",
    ".venv/bin/ryzanstein up": "starts a stack: the test's own stands for it",
    ".venv/bin/python -m pip": "installs from the package index (tests reach no network)",
    ".venv/bin/python benchmarks": "runs a benchmark (minutes), on a model file of the reader's",
    "curl -s localhost:8000": "the compose stack's gateway",
}
# Documented outputs that show a deployment in another state than the test's (a failure example).
OTHER_STATE = ("unhealthy:", "ryzanstein status: Redis at")


@dataclass
class Command:
    text: str
    output: list[str] = field(default_factory=list)  # what the docs show after it (console blocks)


@dataclass
class Block:
    where: str
    lang: str
    commands: list[Command]


def blocks() -> list[Block]:
    found = []
    for path in DOC_FILES:
        text = path.read_text()
        for match in BLOCK.finditer(text):
            line = text.count("\n", 0, match.start()) + 1
            body = [raw[len(match["indent"]):] for raw in match["body"].splitlines()]
            found.append(Block(f"{path.relative_to(REPO)}:{line}", match["lang"], _commands(match["lang"], body)))
    return found


def _commands(lang: str, lines: list[str]) -> list[Command]:
    out: list[Command] = []
    i = 0
    while i < len(lines):
        line = lines[i]
        if lang == "console" and not line.startswith("$ "):
            if out:
                out[-1].output.append(line)
            i += 1
            continue
        if lang != "console" and (not line.strip() or line.lstrip().startswith("#")):
            i += 1
            continue
        line = line[2:] if lang == "console" else line
        while (line.rstrip().endswith("\\") or not _balanced(line)) and i + 1 < len(lines):
            i += 1
            line = (line.rstrip()[:-1] + " " if line.rstrip().endswith("\\") else line + "\n") + lines[i].strip()
        out.append(Command(re.split(r"\s+#\s", line)[0].strip()))
        i += 1
    return out


def _balanced(line: str) -> bool:
    """Whether the quotes of a command line close (a quoted argument may go on over lines)."""
    try:
        shlex.split(line, comments=False)
    except ValueError:
        return False
    return True


def why_not(command: Command) -> str | None:
    text = command.text.removeprefix("RYZ_REDIS_URL=redis://host:6379 ").removeprefix("RYZ_PREFIX=blue ")
    for start, reason in sorted(NOT_HERE.items(), key=lambda kv: -len(kv[0])):
        if text == start or text.startswith((start + " ", start + "/")):
            return reason
    if any(line.startswith(OTHER_STATE) for line in command.output):
        return "shows a deployment in another state (a failure example)"
    return None


@dataclass
class Stack:
    url: str
    gateway: str
    env: dict[str, str]


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    tmp = tmp_path_factory.mktemp("docstack")
    server = EmbeddedRedis().start()
    bin_dir = tmp / "bin"
    bin_dir.mkdir()
    (bin_dir / "ryzanstein").write_text(f"#!/bin/sh\nexec {shlex.quote(sys.executable)} -m ryzanstein \"$@\"\n")
    (bin_dir / "ryzanstein").chmod(0o755)
    redis_cli = Path(server.binary).with_name("redis-cli")
    if redis_cli.is_file():  # as on a terminal (--no-raw), where the docs' outputs were taken; --raw still wins
        (bin_dir / "redis-cli").write_text(f"#!/bin/sh\nexec {shlex.quote(str(redis_cli))} --no-raw \"$@\"\n")
        (bin_dir / "redis-cli").chmod(0o755)
    env = {**os.environ, "RYZ_REDIS_URL": server.url, "RYZ_PREFIX": "ryz", "PYTHONUNBUFFERED": "1",
           "PYTHONPATH": str(REPO), "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}"}
    port = free_port()
    procs = [subprocess.Popen([sys.executable, "-m", module, *args], env=env, cwd=REPO, stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL)
             for module, args in (("balancer", []), ("gpu_workers", ["--model", "echo", "--group", "docs"]),
                                  ("producer", ["gateway", "--port", str(port)]))]
    r = redis.Redis.from_url(server.url)
    try:
        wait_groups(r, Keys("ryz"), {"docs"})
        wait_for(lambda: r.zcard(Keys("ryz").balancers) > 0, what="the balancer")
        yield Stack(server.url, f"http://127.0.0.1:{port}", env)
    finally:
        r.close()
        for proc in procs:
            proc.send_signal(signal.SIGTERM)
        for proc in procs:
            try:
                proc.wait(20)
            except subprocess.TimeoutExpired:
                proc.kill()
        server.stop()


BLOCKS = blocks()
# Files the docs show with `cat FILE` (an input such as prompts.jsonl): written as shown where a
# block uses them, in this block or another.
SHOWN_FILES = {m[1]: c.output for b in BLOCKS for c in b.commands if (m := re.fullmatch(r"cat (\S+)", c.text))
               and not c.text.startswith("cat results")}


def test_the_blocks_were_found() -> None:
    assert len(BLOCKS) > 15
    runnable = [c for b in BLOCKS for c in b.commands if why_not(c) is None]
    assert len(runnable) >= 15  # redis-cli, curl, batch, status... not everything skipped


@pytest.mark.parametrize("block", BLOCKS, ids=lambda b: b.where)
def test_doc_block_runs(block: Block, stack: Stack, tmp_path: Path) -> None:
    background: list[subprocess.Popen[bytes]] = []
    ran, skipped = [], []
    try:
        for command in block.commands:
            reason = why_not(command)
            if reason is not None:
                skipped.append(f"{command.text[:60]}: {reason}")
                continue
            text = command.text.replace(DOC_URL, stack.url).replace(DOC_GATEWAY, stack.gateway)
            for name, shown in SHOWN_FILES.items():
                if re.search(rf"(^|\s){re.escape(name)}(\s|$)", text) and not (tmp_path / name).exists():
                    (tmp_path / name).write_text("\n".join(shown) + "\n")
            if text.endswith(" &"):
                background.append(subprocess.Popen(["bash", "-c", text[:-2]], env=stack.env, cwd=tmp_path,
                                                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
                time.sleep(2)  # a worker the next commands rely on: let it start
                continue
            shown = [line for line in command.output if line.strip()]
            # a reader runs the next command a moment later: reads of results are retried until they
            # show what the docs show (a count exactly; anything, where ids and times differ)
            exact = shown if len(shown) == 1 and re.fullmatch(r"\(integer\) \d+", shown[0]) else None
            deadline = time.monotonic() + 15
            while True:
                done = subprocess.run(["bash", "-o", "pipefail", "-c", text], env=stack.env, cwd=tmp_path,
                                      capture_output=True, text=True, timeout=120, check=False)
                got = done.stdout.strip()
                if (done.returncode != 0 or not shown or (got and (exact is None or got.splitlines() == exact))
                        or time.monotonic() > deadline):
                    break
                time.sleep(0.2)
            assert done.returncode == 0, f"{block.where}: `{text}` exited {done.returncode}: {done.stderr[-800:]}"
            if shown:
                assert got, f"{block.where}: `{text}` printed nothing; the docs show output"
                assert exact is None or got.splitlines() == exact, f"{block.where}: `{text}` printed {got!r}"
            if "batch submit" in text:  # the docs' next command shows the job done: let it finish
                wait_for(lambda: (tmp_path / "results.jsonl").exists()
                         and subprocess.run(["bash", "-c", "ryzanstein batch status"], env=stack.env, cwd=tmp_path,
                                            capture_output=True, text=True, check=False).stdout.split()[1:2]
                         == ["finished"], timeout=60, what="the batch job")
            ran.append(text[:60])
    finally:
        for proc in background:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()
    print(f"{block.where}: ran {len(ran)}, not run {len(skipped)}" + "".join(f"\n  not run: {s}" for s in skipped))
    if not ran:
        pytest.skip(f"nothing here can run: {'; '.join(skipped)}" if skipped else "no commands in this block")
