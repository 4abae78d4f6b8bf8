"""Connections: which Redis a command talks to, clients for every URL form, the Redis clock, backoff."""

from __future__ import annotations

import asyncio
import itertools
import os
import uuid
from pathlib import Path

import pytest
import redis

from broker import connection, embedded
from broker.connection import RedisClock, backoff_delays, connect, connect_async, mask_url, resolve_url
from broker.embedded import EmbeddedRedis
from broker.errors import ConfigError
from broker.settings import Settings, load_settings


@pytest.fixture(autouse=True)
def isolated_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """No RYZ_* from the outside, and a private runtime dir so no real announcement is discovered."""
    for name in list(os.environ):
        if name.upper().startswith("RYZ_"):
            monkeypatch.delenv(name)
    monkeypatch.setenv("XDG_RUNTIME_DIR", str(tmp_path))
    return tmp_path


# --- resolve_url ----------------------------------------------------------------------------------------


def test_explicit_url_wins_over_environment_and_discovery(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("RYZ_REDIS_URL", "redis://env:6379")
    embedded.announce("redis://announced:1", prefix="ryz")
    assert resolve_url(load_settings(redis_url="redis://explicit:1")) == "redis://explicit:1"


def test_environment_wins_over_discovery(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("RYZ_REDIS_URL", "redis://env:6379")
    embedded.announce("redis://announced:1", prefix="ryz")
    assert resolve_url(Settings()) == "redis://env:6379"
    assert resolve_url(load_settings(redis_url=None)) == "redis://env:6379"


def test_discovery_of_the_embedded_broker_for_the_same_prefix() -> None:
    embedded.announce("redis://announced:1", prefix="mine")
    assert resolve_url(Settings(prefix="mine")) == "redis://announced:1"
    with pytest.raises(ConfigError):
        resolve_url(Settings(prefix="other"))


def test_nothing_to_talk_to_is_a_helpful_config_error() -> None:
    with pytest.raises(ConfigError) as info:
        resolve_url(Settings())
    message = str(info.value)
    assert "--redis-url" in message
    assert "RYZ_REDIS_URL" in message
    assert "ryzanstein up" in message and "ryzanstein broker" in message


class FakeTime:
    """Stands in for the time module: sleep() advances monotonic() instead of waiting."""

    def __init__(self) -> None:
        self.now = 100.0
        self.slept = 0.0

    def monotonic(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.now += seconds
        self.slept += seconds


def test_waits_for_an_announcement_up_to_wait_s(monkeypatch: pytest.MonkeyPatch) -> None:
    fake = FakeTime()
    monkeypatch.setattr(connection, "time", fake)
    calls = itertools.count()
    monkeypatch.setattr(
        embedded, "discover", lambda *, prefix: "redis://late:1" if next(calls) >= 5 else None
    )
    assert resolve_url(Settings(), wait_s=10.0) == "redis://late:1"
    assert 0 < fake.slept < 10.0


def test_gives_up_after_wait_s(monkeypatch: pytest.MonkeyPatch) -> None:
    fake = FakeTime()
    monkeypatch.setattr(connection, "time", fake)
    monkeypatch.setattr(embedded, "discover", lambda *, prefix: None)
    with pytest.raises(ConfigError):
        resolve_url(Settings(), wait_s=2.0)
    assert 2.0 <= fake.slept <= 2.5


def test_a_live_announced_broker_is_found_and_reachable() -> None:
    with EmbeddedRedis() as server:
        embedded.announce(server.url, prefix="live")
        url = resolve_url(Settings(prefix="live"))
        assert url == server.url
        assert connect(url, Settings()).ping()


# --- clients ----------------------------------------------------------------------------------------------


def test_connect_redis_url(redis_url: str) -> None:
    client = connect(redis_url, Settings())
    client.set("k", "v")
    assert client.get("k") == b"v"
    assert connect(redis_url, Settings(), decode_responses=True).get("k") == "v"


def test_connect_applies_timeouts_from_settings(redis_url: str) -> None:
    settings = Settings(socket_timeout_s=7.5, connect_timeout_s=1.5)
    kwargs = connect(redis_url, settings).connection_pool.connection_kwargs
    assert (kwargs["socket_timeout"], kwargs["socket_connect_timeout"]) == (7.5, 1.5)


def test_connect_unix_socket_url() -> None:
    with EmbeddedRedis(unix_socket=True) as server:
        assert server.url.startswith("unix://")
        assert connect(server.url, Settings()).ping()


def test_connect_with_acl_user_and_password(r: redis.Redis, redis_url: str) -> None:
    user, password = f"u{uuid.uuid4().hex[:8]}", uuid.uuid4().hex
    r.acl_setuser(user, enabled=True, passwords=[f"+{password}"], keys=["*"], commands=["+@all"])
    try:
        authed = redis_url.replace("redis://", f"redis://{user}:{password}@")
        assert connect(authed, Settings()).acl_whoami() in (user, user.encode())
        wrong = redis_url.replace("redis://", f"redis://{user}:wrong@")
        with pytest.raises(redis.AuthenticationError):
            connect(wrong, Settings()).ping()
    finally:
        r.acl_deluser(user)


def test_connect_async(redis_url: str) -> None:
    async def roundtrip() -> bytes | None:
        client = connect_async(redis_url, Settings())
        try:
            await client.set("ak", "av")
            return await client.get("ak")
        finally:
            await client.aclose()

    assert asyncio.run(roundtrip()) == b"av"


# --- backoff ---------------------------------------------------------------------------------------------


def test_backoff_is_bounded_by_the_cap() -> None:
    settings = Settings(reconnect_base_s=0.05, reconnect_cap_s=2.0)
    delays = list(itertools.islice(backoff_delays(settings), 200))
    assert all(0.025 <= d <= 2.0 for d in delays)
    assert delays[0] <= 0.05
    assert max(delays[-20:]) > 1.0  # it does grow to the cap


@pytest.mark.parametrize(("jitter", "scale"), [(1.0, 1.0), (0.0, 0.5)])
def test_backoff_doubles_up_to_the_cap(monkeypatch: pytest.MonkeyPatch, jitter: float, scale: float) -> None:
    monkeypatch.setattr(connection.random, "random", lambda: jitter)
    settings = Settings(reconnect_base_s=0.1, reconnect_cap_s=1.0)
    delays = list(itertools.islice(backoff_delays(settings), 7))
    assert delays == pytest.approx([scale * d for d in (0.1, 0.2, 0.4, 0.8, 1.0, 1.0, 1.0)])


# --- RedisClock -------------------------------------------------------------------------------------------


class FakeServer:
    """A Redis TIME that can jump, fail, and counts its calls."""

    def __init__(self, secs: int, micros: int) -> None:
        self.reply = (secs, micros)
        self.calls = 0
        self.fail: BaseException | None = None

    def __call__(self) -> tuple[int, int]:
        self.calls += 1
        if self.fail is not None:
            raise self.fail
        return self.reply


class FakeMonotonic:
    def __init__(self, now: float) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def test_clock_adds_the_server_offset_to_local_monotonic_time() -> None:
    server, mono = FakeServer(1_000, 500_000), FakeMonotonic(10.0)
    clock = RedisClock(server, refresh_s=30.0, monotonic=mono)
    assert clock.now_ms() == pytest.approx(1_000_500.0)
    mono.now = 12.25
    assert clock.now_ms() == pytest.approx(1_002_750.0)
    assert server.calls == 1  # within refresh_s: no round trip


def test_clock_refreshes_after_the_interval() -> None:
    server, mono = FakeServer(1_000, 0), FakeMonotonic(0.0)
    clock = RedisClock(server, refresh_s=5.0, monotonic=mono)
    clock.now_ms()
    server.reply = (2_000, 0)  # the server's clock was stepped
    mono.now = 4.9
    assert clock.now_ms() == pytest.approx(1_004_900.0)
    assert server.calls == 1
    mono.now = 5.0
    assert clock.now_ms() == pytest.approx(2_000_000.0)
    assert server.calls == 2
    mono.now = 6.0
    assert clock.now_ms() == pytest.approx(2_001_000.0)
    assert server.calls == 2


def test_clock_keeps_the_last_offset_on_a_transient_error() -> None:
    server, mono = FakeServer(1_000, 0), FakeMonotonic(0.0)
    clock = RedisClock(server, refresh_s=1.0, monotonic=mono)
    clock.now_ms()
    server.fail = redis.ConnectionError("blip")
    mono.now = 3.0
    assert clock.now_ms() == pytest.approx(1_003_000.0)
    mono.now = 3.5
    assert clock.now_ms() == pytest.approx(1_003_500.0)
    assert server.calls == 3  # it keeps trying on every call while stale
    server.fail = None
    server.reply = (5_000, 0)
    assert clock.now_ms() == pytest.approx(5_000_000.0)


@pytest.mark.parametrize("error", [redis.ConnectionError("down"), redis.TimeoutError("slow"), OSError("net")])
def test_clock_without_any_sync_raises(error: BaseException) -> None:
    server = FakeServer(1, 0)
    server.fail = error
    clock = RedisClock(server, monotonic=FakeMonotonic(0.0))
    with pytest.raises(type(error)):
        clock.now_ms()


def test_clock_tracks_a_real_server(r: redis.Redis) -> None:
    clock = RedisClock(r.time)
    secs, micros = r.time()
    server_ms = secs * 1000 + micros / 1000
    assert abs(clock.now_ms() - server_ms) < 1000


@pytest.mark.parametrize(("url", "shown"), [
    ("redis://app:s3cr%40t@db:6379/0", "redis://app:***@db:6379/0"),
    ("rediss://:onlypass@db:6380", "rediss://:***@db:6380"),
    ("unix://app:pw@/run/redis.sock?db=1", "unix://app:***@/run/redis.sock?db=1"),
    ("redis+cluster://u:pw@a:7000,b:7001", "redis+cluster://u:***@a:7000,b:7001"),
    ("redis://db:6379/0?password=pw&db=2", "redis://db:6379/0?password=***&db=2"),
    ("redis://127.0.0.1:6390", "redis://127.0.0.1:6390"),
    ("unix:///tmp/r.sock", "unix:///tmp/r.sock"),
])
def test_mask_url_hides_the_password(url: str, shown: str) -> None:
    assert mask_url(url) == shown


def test_a_balancer_never_prints_its_password(r: redis.Redis, redis_url: str, subprocess_env: dict[str, str]) -> None:
    """Given in the environment (as docs/OPERATIONS.md advises), the password stays out of the output."""
    import subprocess
    import sys

    user, password = f"u{uuid.uuid4().hex[:8]}", uuid.uuid4().hex
    r.acl_setuser(user, enabled=True, passwords=[f"+{password}"], keys=["*"], commands=["+@all"])
    env = {**subprocess_env, "RYZ_REDIS_URL": redis_url.replace("redis://", f"redis://{user}:{password}@")}
    proc = subprocess.Popen([sys.executable, "-m", "balancer"], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()
        assert line.startswith("balancer ") and f"{user}:***@" in line, line
        assert password not in line
        assert password not in Path(f"/proc/{proc.pid}/cmdline").read_text()
    finally:
        proc.terminate()
        proc.wait(timeout=10)
        r.acl_deluser(user)
