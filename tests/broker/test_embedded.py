"""The embedded redis-server: ports, sockets, persistence, dying with its parent, and discovery."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import redis

from broker import embedded
from broker.embedded import EmbeddedRedis
from broker.errors import ConfigError


def ping(url: str) -> bool:
    client = redis.Redis.from_url(url, socket_connect_timeout=1, socket_timeout=1)
    try:
        return bool(client.ping())
    finally:
        client.close()


def gone(pid: int) -> bool:
    """True once ``pid`` has exited (a zombie waiting for its reaper counts as gone)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return True
    return stat.rsplit(")", 1)[1].split()[0] == "Z"


def wait_until(predicate, timeout_s: float) -> bool:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.02)
    return predicate()


def test_starts_on_a_free_loopback_port_and_answers() -> None:
    with EmbeddedRedis() as a, EmbeddedRedis() as b:
        assert a.port > 0 and a.port != 6379
        assert a.port != b.port
        assert a.url == f"redis://127.0.0.1:{a.port}"
        assert ping(a.url) and ping(b.url)
        redis.Redis.from_url(a.url).set("k", "a")
        assert redis.Redis.from_url(b.url).get("k") is None


def test_stop_ends_the_server_and_removes_its_own_dir() -> None:
    server = EmbeddedRedis().start()
    proc, data_dir, url = server.proc, server.dir, server.url
    assert proc is not None and data_dir.is_dir()
    server.stop()
    assert proc.poll() is not None
    assert not data_dir.exists()
    with pytest.raises(redis.ConnectionError):
        ping(url)
    server.stop()  # idempotent


def test_stop_keeps_a_given_data_dir(tmp_path: Path) -> None:
    with EmbeddedRedis(data_dir=str(tmp_path)) as server:
        assert ping(server.url)
    assert tmp_path.is_dir()
    assert (tmp_path / "redis.log").exists()


def test_unix_socket_mode() -> None:
    server = EmbeddedRedis(unix_socket=True).start()
    try:
        assert server.socket_path is not None
        assert server.url == f"unix://{server.socket_path}"
        assert server.socket_path.exists()
        assert ping(server.url)
        assert server.port == 0  # no TCP listener at all
    finally:
        server.stop()
    assert not server.socket_path.exists()
    assert not server.dir.exists()


def test_appendonly_writes_an_aof_and_data_survives_kill_and_restart(tmp_path: Path) -> None:
    # appendfsync always: with everysec, a busy machine can delay the AOF write past the SIGKILL.
    server = EmbeddedRedis(appendonly=True, appendfsync="always", data_dir=str(tmp_path)).start()
    client = redis.Redis.from_url(server.url)
    client.set("survivor", "yes")
    client.xadd("stream", {"f": "v"})
    client.close()
    aof_files = [p for p in tmp_path.rglob("*") if p.is_file() and "appendonly" in p.name]
    assert aof_files and any(p.stat().st_size > 0 for p in aof_files)

    server.kill()
    assert server.proc is not None and server.proc.returncode == -signal.SIGKILL
    assert tmp_path.is_dir()

    restarted = EmbeddedRedis(appendonly=True, data_dir=str(tmp_path)).start()
    try:
        client = redis.Redis.from_url(restarted.url)
        assert client.get("survivor") == b"yes"
        assert client.xlen("stream") == 1
        client.close()
    finally:
        restarted.stop()


def test_without_appendonly_nothing_is_persisted(tmp_path: Path) -> None:
    server = EmbeddedRedis(data_dir=str(tmp_path)).start()
    redis.Redis.from_url(server.url).set("k", "v")
    server.kill()
    restarted = EmbeddedRedis(data_dir=str(tmp_path)).start()
    try:
        assert redis.Redis.from_url(restarted.url).get("k") is None
    finally:
        restarted.stop()


def test_a_server_that_exits_at_start_is_a_config_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="exited"):
        EmbeddedRedis(binary="/bin/false", data_dir=str(tmp_path)).start()
    assert tmp_path.is_dir()  # a given data dir is the caller's


def test_a_failed_start_leaves_no_temp_dir() -> None:
    server = EmbeddedRedis(binary="/bin/false")
    with pytest.raises(ConfigError, match="exited"):
        server.start()
    assert not server.dir.exists()


def test_a_busy_port_is_a_config_error(redis_server: EmbeddedRedis, tmp_path: Path) -> None:
    # The server already on the port answers PING too; start() must not mistake it for its own.
    with pytest.raises(ConfigError, match="exited"):
        EmbeddedRedis(port=redis_server.port, data_dir=str(tmp_path)).start()
    assert ping(redis_server.url)


def test_free_port_is_bindable() -> None:
    import socket

    port = embedded.free_port()
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", port))


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="PR_SET_PDEATHSIG is Linux only")
def test_server_dies_when_its_parent_is_killed(tmp_path: Path) -> None:
    parent_code = textwrap.dedent(f"""
        import sys, time
        from broker.embedded import EmbeddedRedis
        server = EmbeddedRedis(data_dir={str(tmp_path)!r}).start()
        print(server.proc.pid, server.url, flush=True)
        time.sleep(120)
    """)
    parent = subprocess.Popen([sys.executable, "-c", parent_code], stdout=subprocess.PIPE, text=True)
    redis_pid = None
    try:
        assert parent.stdout is not None
        line = parent.stdout.readline()
        assert line, "the parent did not start its server"
        pid_text, url = line.split()
        redis_pid = int(pid_text)
        assert ping(url)
        assert not gone(redis_pid)
        parent.send_signal(signal.SIGKILL)
        parent.wait(10)
        assert wait_until(lambda: gone(redis_pid), timeout_s=10), (
            f"redis-server {redis_pid} outlived its parent"
        )
    finally:
        if parent.poll() is None:
            parent.kill()
            parent.wait()
        if redis_pid is not None and not gone(redis_pid):  # the test failed: leave no server behind
            os.kill(redis_pid, signal.SIGKILL)


# --- announce / discover / withdraw --------------------------------------------------------------------


@pytest.fixture
def runtime_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("XDG_RUNTIME_DIR", str(tmp_path))
    return tmp_path


def test_announce_then_discover(runtime_dir: Path) -> None:
    path = embedded.announce("redis://127.0.0.1:1234", prefix="p1")
    assert path.is_relative_to(runtime_dir)
    assert json.loads(path.read_text()) == {"url": "redis://127.0.0.1:1234", "pid": os.getpid()}
    assert embedded.discover(prefix="p1") == "redis://127.0.0.1:1234"
    assert embedded.discover(prefix="p2") is None


def test_announcements_are_per_prefix(runtime_dir: Path) -> None:
    embedded.announce("redis://a", prefix="p1")
    embedded.announce("unix:///tmp/b.sock", prefix="p2")
    assert embedded.discover(prefix="p1") == "redis://a"
    assert embedded.discover(prefix="p2") == "unix:///tmp/b.sock"
    embedded.announce("redis://c", prefix="p1")  # a newer broker replaces the record
    assert embedded.discover(prefix="p1") == "redis://c"


def test_withdraw_removes_only_our_own_announcement(runtime_dir: Path) -> None:
    path = embedded.announce("redis://a", prefix="p1")
    embedded.withdraw(prefix="p1")
    assert not path.exists()
    assert embedded.discover(prefix="p1") is None
    embedded.withdraw(prefix="p1")  # nothing to withdraw: no error

    # Another live process's announcement stays.
    path.write_text(json.dumps({"url": "redis://other", "pid": os.getppid()}))
    embedded.withdraw(prefix="p1")
    assert path.exists()
    assert embedded.discover(prefix="p1") == "redis://other"


def test_announcement_of_a_dead_process_is_ignored(runtime_dir: Path) -> None:
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    path = embedded.announce("redis://a", prefix="p1")
    path.write_text(json.dumps({"url": "redis://a", "pid": dead.pid}))
    assert embedded.discover(prefix="p1") is None


@pytest.mark.parametrize(
    "content",
    ["", "not json", "[]", '{"url": "redis://a"}', '{"pid": 1}', '{"url": "redis://a", "pid": "x"}'],
)
def test_damaged_announcement_is_ignored(runtime_dir: Path, content: str) -> None:
    path = embedded.announce("redis://a", prefix="p1")
    path.write_text(content)
    assert embedded.discover(prefix="p1") is None


def test_without_xdg_runtime_dir_a_per_user_temp_dir_is_used(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("XDG_RUNTIME_DIR", raising=False)
    monkeypatch.setattr(embedded.tempfile, "tempdir", str(tmp_path))
    path = embedded.announce("redis://a", prefix="p1")
    assert path.is_relative_to(tmp_path / f"ryzanstein-{os.getuid()}")
    assert embedded.discover(prefix="p1") == "redis://a"
