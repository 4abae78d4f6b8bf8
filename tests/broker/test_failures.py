"""Redis failures become one line and an exit code, never a traceback (broker.failures): each kind
(credentials, permissions, TLS, out of memory, unreachable) provoked on a real server, read by
``describe`` in-process and by the commands users run."""

from __future__ import annotations

import shutil
import socket
import ssl
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis

from broker.embedded import EmbeddedRedis, free_port
from broker.failures import EXIT_FATAL, EXIT_UNAVAILABLE, FatalRedisError, describe, raise_if_fatal

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def locked() -> Iterator[EmbeddedRedis]:
    """A server of its own that requires a password (the shared one must stay open)."""
    with EmbeddedRedis() as server:
        conn = redis.Redis.from_url(server.url)
        conn.config_set("requirepass", "sesame")
        conn.close()
        yield server


@pytest.fixture(scope="module")
def full() -> Iterator[EmbeddedRedis]:
    """A server at its maxmemory: writes are refused with OOM."""
    with EmbeddedRedis() as server:
        conn = redis.Redis.from_url(server.url)
        conn.config_set("maxmemory", "1")
        conn.close()
        yield server


@pytest.fixture(scope="module")
def tls_port(tmp_path_factory: pytest.TempPathFactory) -> Iterator[int]:
    """A TLS endpoint with a self-signed certificate (no client trusts it)."""
    if shutil.which("openssl") is None:
        pytest.skip("no openssl binary to make a certificate with")
    tmp = tmp_path_factory.mktemp("tls")
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", str(tmp / "key.pem"),
                    "-out", str(tmp / "cert.pem"), "-days", "1", "-subj", "/CN=localhost"],
                   check=True, capture_output=True)
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(tmp / "cert.pem", tmp / "key.pem")
    listener = socket.create_server(("127.0.0.1", 0))
    stop = threading.Event()

    def serve() -> None:
        listener.settimeout(0.2)
        while not stop.is_set():
            try:
                conn, _ = listener.accept()
            except TimeoutError:
                continue
            try:
                with context.wrap_socket(conn, server_side=True):
                    pass
            except (ssl.SSLError, OSError):
                conn.close()

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    yield listener.getsockname()[1]
    stop.set()
    thread.join(5)
    listener.close()


def _error(url: str, fn: str = "ping") -> BaseException:
    conn = redis.Redis.from_url(url, socket_connect_timeout=2, socket_timeout=2)
    try:
        getattr(conn, fn)() if fn == "ping" else conn.set("k", "v" * 1000)
    except Exception as exc:  # noqa: BLE001 - the error is what is tested
        return exc
    finally:
        conn.close()
    raise AssertionError("no error")


def test_wrong_and_missing_passwords_are_fatal(locked: EmbeddedRedis) -> None:
    wrong = locked.url.replace("redis://", "redis://:nope@")
    for url in (wrong, locked.url):
        problem = describe(_error(url), url)
        assert problem is not None and problem.fatal and problem.exit_code == EXIT_FATAL
        assert "refused the credentials" in problem.line and "nope" not in problem.line
        assert "\n" not in problem.line


def test_a_tls_certificate_that_does_not_verify_is_fatal(tls_port: int) -> None:
    url = f"rediss://127.0.0.1:{tls_port}"
    problem = describe(_error(url), url)
    assert problem is not None and problem.fatal and problem.line.startswith(f"TLS with Redis at 127.0.0.1:{tls_port}")
    with pytest.raises(FatalRedisError):
        raise_if_fatal(_error(url))


def test_out_of_memory_and_unreachable_are_not_fatal(full: EmbeddedRedis) -> None:
    problem = describe(_error(full.url, "set"), full.url)
    assert problem is not None and not problem.fatal and problem.exit_code == EXIT_UNAVAILABLE
    assert "out of memory" in problem.line
    url = f"redis://127.0.0.1:{free_port()}"
    problem = describe(_error(url), url)
    assert problem is not None and not problem.fatal and problem.line.startswith("cannot reach Redis at 127.0.0.1")
    raise_if_fatal(_error(url))  # a loop waits and retries: nothing raised


def test_a_bug_is_not_described() -> None:
    assert describe(ValueError("x")) is None and describe(FileNotFoundError("input.jsonl")) is None


def _ryz(*args: str, url: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "ryzanstein", *args, "--redis-url", url], cwd=REPO,
                          capture_output=True, text=True, timeout=60, check=False)


@pytest.mark.parametrize("command", [["status"], ["submit", "hi"], ["balancer"], ["worker"]])
def test_commands_print_one_line_for_wrong_credentials(locked: EmbeddedRedis, command: list[str]) -> None:
    # The long-running ones too: retrying a wrong password forever would only hide it.
    done = _ryz(*command, url=locked.url.replace("redis://", "redis://:nope@"))
    assert done.returncode == EXIT_FATAL
    assert "Traceback" not in done.stderr
    last = done.stderr.strip().splitlines()[-1]
    assert last.startswith(f"ryzanstein {command[0]}: Redis at 127.0.0.1:{locked.port} refused the credentials")


def test_commands_print_one_line_for_tls_oom_and_unreachable(tls_port: int, full: EmbeddedRedis) -> None:
    for args, url, code, says in [
        (["status"], f"rediss://127.0.0.1:{tls_port}", EXIT_FATAL, "TLS with Redis at"),
        (["submit", "hi"], full.url, EXIT_UNAVAILABLE, "is out of memory and refuses writes"),
        (["status"], f"redis://127.0.0.1:{free_port()}", EXIT_UNAVAILABLE, "cannot reach Redis at"),
    ]:
        done = _ryz(*args, url=url)
        assert done.returncode == code, done.stderr
        assert "Traceback" not in done.stderr and len(done.stderr.strip().splitlines()) == 1, done.stderr
        assert says in done.stderr
