"""The repo's Procfile under honcho: the embedded broker, a balancer and three worker groups find each
other with no URL configured, each group with its own name and metrics port, serve a request, and all
stop on one SIGTERM to honcho."""

from __future__ import annotations

import contextlib
import os
import re
import signal
import socket
import subprocess
import sys
import urllib.request
import uuid
from pathlib import Path

import pytest
import redis

from broker import embedded
from broker.keys import Keys
from broker.registry import GroupStatus, read_groups
from tests.integration.conftest import final_events, wait_for

pytestmark = [pytest.mark.integration, pytest.mark.slow]

REPO = Path(__file__).resolve().parents[2]
VENV_BIN = Path(sys.executable).parent
HONCHO = VENV_BIN / "honcho"
WORKERS = 3
# honcho SIGKILLs what is left 5 s after its own SIGTERM; the rest is slack for a loaded CI machine.
STOP_WITHIN_S = 30.0

Identity = tuple[int, str]  # (pid, start time in clock ticks): a pid that was reused is not ours


def _processes() -> dict[int, tuple[int, str]]:
    """pid -> (parent pid, start time) of every process we can see, from /proc."""
    out = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue  # exited meanwhile
        # The command name (field 2) may hold spaces and parentheses: split after its last ')'.
        rest = stat[stat.rindex(")") + 2 :].split()
        out[int(entry.name)] = (int(rest[1]), rest[19])  # fields 4 (ppid) and 22 (starttime)
    return out


def _descendants(root: int) -> set[Identity]:
    procs = _processes()
    children: dict[int, list[int]] = {}
    for pid, (ppid, _start) in procs.items():
        children.setdefault(ppid, []).append(pid)
    found: set[Identity] = set()
    todo = list(children.get(root, []))
    while todo:
        pid = todo.pop()
        found.add((pid, procs[pid][1]))
        todo += children.get(pid, [])
    return found


def _still_running(identities: set[Identity]) -> set[Identity]:
    procs = _processes()
    return {(pid, start) for pid, start in identities if pid in procs and procs[pid][1] == start}


def _free_port_base() -> int:
    """A honcho base port whose Procfile ports (base + 100 for the balancer, + 200.. for workers) are free."""
    for _ in range(50):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            base = s.getsockname()[1] - 200
        if base < 1024 or base + 200 + WORKERS > 65535:
            continue
        try:
            probes = [socket.socket() for _ in range(WORKERS + 1)]
            for probe, port in zip(probes, [base + 100, *range(base + 200, base + 200 + WORKERS)], strict=True):
                probe.bind(("0.0.0.0", port))
            return base
        except OSError:
            continue
        finally:
            for probe in probes:
                probe.close()
    raise AssertionError("no free port range for the Procfile")


def _alive_groups(r: redis.Redis, keys: Keys) -> list[GroupStatus]:
    return [g for g in read_groups(r, keys, dead_after_s=3.0) if g.routable]


def test_procfile_runs_three_groups_serves_and_stops(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    assert HONCHO.is_file(), f"honcho is not installed next to {sys.executable} (it is in the [test] extras)"
    prefix = f"pf{uuid.uuid4().hex[:8]}"
    keys = Keys(prefix)
    runtime_dir = tmp_path / "runtime"  # the broker's announcement goes here, away from any other stack
    runtime_dir.mkdir(mode=0o700)
    env = {k: v for k, v in os.environ.items() if k != "RYZ_REDIS_URL"}
    env.update(
        PATH=f"{VENV_BIN}{os.pathsep}{env.get('PATH', '')}",
        RYZ_PREFIX=prefix,
        XDG_RUNTIME_DIR=str(runtime_dir),
        PYTHONUNBUFFERED="1",
        PORT=str(base := _free_port_base()),  # honcho's base port, as `honcho start -p BASE` sets it
    )
    # discover() below must look where the Procfile's broker announces itself.
    monkeypatch.setenv("XDG_RUNTIME_DIR", str(runtime_dir))
    monkeypatch.delenv("RYZ_REDIS_URL", raising=False)

    log_path = tmp_path / "honcho.log"
    with open(log_path, "wb") as log:
        honcho = subprocess.Popen(
            [str(HONCHO), "start", "-f", str(REPO / "Procfile"), "-d", str(REPO), "--no-colour",
             "-c", f"worker={WORKERS}"],
            env=env, cwd=REPO, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    # honcho starts every Procfile line in a session of its own, outside honcho's process group:
    # remember every descendant, so that none outlives the test whatever happens.
    started: set[Identity] = set()
    client: redis.Redis | None = None
    try:
        url = wait_for(lambda: embedded.discover(prefix=prefix), timeout=60, what="the broker's announcement")
        client = redis.Redis.from_url(url, socket_timeout=5, socket_connect_timeout=5)
        groups = wait_for(lambda: len(_alive_groups(client, keys)) >= WORKERS and _alive_groups(client, keys),
                          timeout=60, what=f"{WORKERS} alive worker groups")
        names = {g.name for g in groups}
        assert len(names) == WORKERS, f"group names are not distinct: {sorted(names)}"
        assert names == {f"{socket.gethostname()}-worker.{n}" for n in range(1, WORKERS + 1)}
        assert {g.model for g in groups} == {"echo"}
        assert sorted(g.metrics_port for g in groups) == list(range(base + 200, base + 200 + WORKERS))
        for port in (base + 100, base + 200):  # the balancer's and the first group's endpoints
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as answer:
                assert b"ryz_" in answer.read()
        started |= _descendants(honcho.pid)

        client.xadd(keys.requests, {"id": "procfile-1", "prompt": "through the Procfile", "max_tokens": "64"})
        finals = wait_for(lambda: final_events(client, keys.result("procfile-1")), timeout=30,
                          what="the done event")
        assert len(finals) == 1
        assert finals[0][b"event"] == b"done", finals[0]
        assert finals[0][b"text"] == b"through the Procfile"
        assert finals[0][b"finish_reason"] == b"stop"

        started |= _descendants(honcho.pid)
        os.killpg(honcho.pid, signal.SIGTERM)
        try:
            honcho.wait(STOP_WITHIN_S)
        except subprocess.TimeoutExpired:
            pytest.fail(f"honcho did not exit within {STOP_WITHIN_S}s of SIGTERM")

        # A clean stop: the broker outlived its clients, so every group drained and deregistered
        # (it says so), nothing needed SIGKILL, every line exited 0, and no traceback was printed.
        text = log_path.read_text(errors="replace")
        for n in range(1, WORKERS + 1):
            assert f"group {socket.gethostname()}-worker.{n} deregistered" in text
        assert "SIGKILL" not in text and "Traceback" not in text
        stopped = re.findall(r"(\w+\.\d+) stopped \(rc=(-?\d+)\)", text)
        assert len(stopped) == WORKERS + 3 and {rc for _name, rc in stopped} == {"0"}, stopped
        with contextlib.suppress(AssertionError):
            wait_for(lambda: not _still_running(started), timeout=10, what="every process to exit")
        assert not _still_running(started), f"processes left running: {sorted(_still_running(started))}"
    finally:
        if client is not None:
            client.close()
        if honcho.poll() is None:  # the test failed before honcho was stopped: stop it now
            started |= _descendants(honcho.pid)
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(honcho.pid, signal.SIGTERM)  # honcho stops its children and reaps its helpers
            try:
                honcho.wait(STOP_WITHIN_S)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.killpg(honcho.pid, signal.SIGKILL)
                honcho.wait()
        for pid, _start in _still_running(started):
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(pid, signal.SIGKILL)
        print(log_path.read_text(errors="replace")[-6000:])  # shown when the test fails
