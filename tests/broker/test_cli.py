"""``python -m broker``: the embedded Redis in the foreground, announced while it runs."""

from __future__ import annotations

import os
import select
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import redis

from broker import embedded


def read_line(proc: subprocess.Popen[str], timeout_s: float) -> str:
    assert proc.stdout is not None
    ready, _, _ = select.select([proc.stdout], [], [], timeout_s)
    assert ready, "no output in time"
    return proc.stdout.readline()


def redis_pid(url: str) -> int:
    client = redis.Redis.from_url(url)
    try:
        return int(client.info("server")["process_id"])
    finally:
        client.close()


def gone(pid: int, timeout_s: float) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        except FileNotFoundError:
            return True
        if state == "Z":
            return True
        time.sleep(0.02)
    return False


@pytest.fixture
def env(tmp_path: Path, prefix: str) -> dict[str, str]:
    out = {k: v for k, v in os.environ.items() if not k.upper().startswith("RYZ_")}
    out.update(XDG_RUNTIME_DIR=str(tmp_path), RYZ_PREFIX=prefix, PYTHONUNBUFFERED="1")
    return out


@pytest.mark.parametrize("extra", [[], ["--unix-socket"]])
def test_broker_announces_itself_and_withdraws_on_sigterm(
    env: dict[str, str], prefix: str, monkeypatch: pytest.MonkeyPatch, extra: list[str]
) -> None:
    monkeypatch.setenv("XDG_RUNTIME_DIR", env["XDG_RUNTIME_DIR"])
    proc = subprocess.Popen(
        [sys.executable, "-m", "broker", *extra], env=env, stdout=subprocess.PIPE, text=True
    )
    try:
        line = read_line(proc, timeout_s=20)
        assert "serving" in line, line
        url = embedded.discover(prefix=prefix)
        assert url is not None and url in line
        assert url.startswith("unix://" if extra else "redis://127.0.0.1:")
        pid = redis_pid(url)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(15) == 0
        assert embedded.discover(prefix=prefix) is None
        assert gone(pid, timeout_s=10)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_broker_on_a_busy_port_fails(
    env: dict[str, str], redis_server: embedded.EmbeddedRedis, prefix: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("XDG_RUNTIME_DIR", env["XDG_RUNTIME_DIR"])
    proc = subprocess.run(
        [sys.executable, "-m", "broker", "--port", str(redis_server.port)],
        check=False,
        env=env,
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert proc.returncode != 0
    assert "exited" in proc.stderr
    # It must not have announced the other server as its own.
    assert embedded.discover(prefix=prefix) is None
