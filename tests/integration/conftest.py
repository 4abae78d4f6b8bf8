"""Real processes on the real test Redis: spawn ryzanstein components, wait for them, kill them."""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import redis

from broker.keys import Keys
from broker.registry import read_groups


def wait_for(condition: Callable[[], Any], *, timeout: float = 20.0, what: str = "condition") -> Any:
    """Poll an external process' observable state until it holds (processes run on their own clock)."""
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(0.02)


@dataclass
class Procs:
    env: dict[str, str]
    log_dir: Path
    started: list[subprocess.Popen[bytes]] = field(default_factory=list)

    def spawn(self, module: str, *args: str, env: dict[str, str] | None = None,
              cwd: Path | None = None) -> subprocess.Popen[bytes]:
        log = open(self.log_dir / f"{len(self.started):02d}-{module}.log", "wb")  # noqa: SIM115
        proc = subprocess.Popen([sys.executable, "-m", module, *args], env={**self.env, **(env or {})},
                                stdout=log, stderr=subprocess.STDOUT, cwd=cwd)
        log.close()
        self.started.append(proc)
        return proc

    def logs(self) -> str:
        return "\n".join(f"--- {p.name}\n{p.read_text(errors='replace')[-3000:]}" for p in sorted(self.log_dir.iterdir()))

    def balancer(self, **env: str) -> subprocess.Popen[bytes]:
        return self.spawn("balancer", env=env)

    def worker(self, group: str, *args: str, **env: str) -> subprocess.Popen[bytes]:
        return self.spawn("gpu_workers", "--model", "echo", "--group", group, *args, env=env)

    def stop_all(self) -> None:
        for proc in self.started:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        for proc in self.started:
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


@pytest.fixture
def procs(subprocess_env: dict[str, str], tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[Procs]:
    """Spawns processes; stops them after the test and prints their logs if it failed."""
    log_dir = tmp_path / "logs"
    log_dir.mkdir()
    manager = Procs(subprocess_env, log_dir)
    yield manager
    manager.stop_all()
    report = getattr(request.node, "rep_call", None)
    if report is not None and report.failed:
        print(manager.logs())


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Iterator[None]:
    outcome = yield
    report = outcome.get_result()
    setattr(item, f"rep_{report.when}", report)


def wait_groups(r: redis.Redis, keys: Keys, names: set[str], *, timeout: float = 30.0) -> None:
    def alive() -> bool:
        return names <= {g.name for g in read_groups(r, keys, dead_after_s=3.0) if g.routable}

    wait_for(alive, timeout=timeout, what=f"groups {sorted(names)} to be alive")


def final_events(r: redis.Redis, reply: str) -> list[dict[bytes, bytes]]:
    return [f for _id, f in r.xrange(reply) if f[b"event"] in (b"done", b"error")]


def send_many(r: redis.Redis, keys: Keys, n: int, *, tag: str = "r", **fields: str) -> list[str]:
    ids = [f"{tag}{i}" for i in range(n)]
    pipe = r.pipeline(transaction=False)
    for rid in ids:
        pipe.xadd(keys.requests, {"id": rid, "prompt": f"echo {rid}", **fields})
    pipe.execute()
    return ids


def all_finished(r: redis.Redis, keys: Keys, ids: list[str]) -> bool:
    pipe = r.pipeline(transaction=False)
    for rid in ids:
        pipe.hexists(keys.state(keys.result(rid), rid), "final")
    return all(pipe.execute())
