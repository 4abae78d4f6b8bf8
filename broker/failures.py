"""What went wrong with Redis, in one line a person can act on, and whether waiting can cure it.

Commands print ``describe(exc).line`` instead of a traceback; long-running loops (balancer, worker
group) retry what waiting may cure (Redis down, out of memory, a replica promoted) and stop with
the line and exit code 2 on what it cannot (a wrong password, a missing ACL permission, a TLS
certificate that does not verify): retrying those forever only hides them.
"""

from __future__ import annotations

import socket
import ssl
from dataclasses import dataclass
from urllib.parse import urlsplit

from redis import exceptions as rex

from broker.redis_url import parse_url

EXIT_FATAL = 2  # configuration: credentials, permissions, TLS
EXIT_UNAVAILABLE = 1  # Redis unreachable or refusing writes: a later try may work


@dataclass(frozen=True, slots=True)
class Problem:
    line: str  # one line, no traceback
    fatal: bool  # waiting cannot cure it: the configuration must change
    exit_code: int


def where(url: str | None) -> str:
    """The server of ``url`` without credentials, for messages (``host:port`` or the socket path)."""
    if not url:
        return "Redis"
    target = parse_url(url)
    if target.kind == "cluster":
        return "the Redis Cluster at " + ",".join(f"{host}:{port}" for host, port in target.nodes)
    if target.kind == "sentinel":
        return f"Redis '{target.service}' of the Sentinels at " + ",".join(f"{h}:{p}" for h, p in target.nodes)
    parts = urlsplit(url)
    if parts.scheme == "unix":
        return f"Redis at {parts.path}"
    host = parts.hostname or "localhost"
    return f"Redis at {host}:{parts.port or 6379}"


def _is_tls(exc: BaseException) -> bool:
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        if isinstance(current, ssl.SSLError):
            return True
        text = str(current)
        if "SSL" in text or "certificate" in text.lower() or "TLS" in text:
            return True
        current = current.__cause__ or current.__context__
    return False


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__


def describe(exc: BaseException, url: str | None = None) -> Problem | None:
    """The problem ``exc`` shows, or None when it is not a Redis or connection failure (a bug)."""
    server = where(url)
    said = _first_line(exc)
    if "must be called with the client already authenticated" in said:
        said = "it requires a password"  # Redis' answer to HELLO without one, a paragraph long
    auth_words = ("WRONGPASS", "NOAUTH", "invalid username-password", "already authenticated",
                  "Authentication required", "invalid password")
    if isinstance(exc, rex.AuthenticationError) or (
            isinstance(exc, rex.ResponseError) and any(w in said for w in auth_words)):
        return Problem(f"{server} refused the credentials ({said}): check the user and password in "
                       f"--redis-url / RYZ_REDIS_URL (redis://USER:PASSWORD@HOST:PORT)", True, EXIT_FATAL)
    if isinstance(exc, rex.NoPermissionError) or (isinstance(exc, rex.ResponseError) and said.startswith("NOPERM")):
        return Problem(f"the Redis user lacks a permission ({said}): see the ACL sketch in docs/OPERATIONS.md",
                       True, EXIT_FATAL)
    if isinstance(exc, rex.OutOfMemoryError) or (isinstance(exc, rex.ResponseError) and said.startswith("OOM")):
        return Problem(f"{server} is out of memory and refuses writes ({said}): raise its maxmemory, or "
                       f"let results expire sooner (RYZ_RESULT_TTL_S)", False, EXIT_UNAVAILABLE)
    if isinstance(exc, rex.ReadOnlyError):
        return Problem(f"{server} is a read-only replica ({said}): point --redis-url at the primary",
                       False, EXIT_UNAVAILABLE)
    if isinstance(exc, rex.BusyLoadingError):
        return Problem(f"{server} is loading its data set: try again shortly", False, EXIT_UNAVAILABLE)
    # redis-py wraps socket errors in its own; a bare BrokenPipeError is our stdout closing (`| head`)
    network = (rex.ConnectionError, rex.TimeoutError, ssl.SSLError, socket.gaierror)
    if isinstance(exc, network) and _is_tls(exc):
        return Problem(f"TLS with {server} failed ({said}): check rediss:// and ssl_ca_certs / ssl_certfile / "
                       f"ssl_keyfile in the URL", True, EXIT_FATAL)
    if isinstance(exc, network):
        hint = ""
        if url and urlsplit(url).scheme.startswith("rediss") and "Timeout" in said:
            hint = " (is TLS on at that port? rediss:// to a plain port waits for a handshake that never comes)"
        return Problem(f"cannot reach {server}: {said}{hint}", False, EXIT_UNAVAILABLE)
    return None


def fatal(exc: BaseException) -> bool:
    """Whether a loop should stop on ``exc`` rather than wait and retry."""
    problem = describe(exc)
    return problem is not None and problem.fatal


class FatalRedisError(Exception):
    """A loop met a Redis failure that waiting cannot cure; ``problem`` says which, in one line."""

    def __init__(self, problem: Problem) -> None:
        super().__init__(problem.line)
        self.problem = problem


def raise_if_fatal(exc: BaseException, url: str | None = None) -> None:
    """Called by retry loops on a Redis error: stop them on what waiting cannot cure."""
    problem = describe(exc, url)
    if problem is not None and problem.fatal:
        raise FatalRedisError(problem) from exc
