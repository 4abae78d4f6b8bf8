"""The Redis URL forms every process accepts, parsed here and nowhere else.

- ``redis://``, ``rediss://`` (TLS), ``unix://``: one server, as redis-py's ``from_url`` reads them.
- ``redis+cluster://[user:password@]host:port[,host:port...]`` (``rediss+cluster://`` for TLS): a
  Redis Cluster; the hosts are startup nodes (any of them will do: the client learns the others and
  the slot map from the first one that answers). Cluster mode has database 0 only.
- ``redis+sentinel://[user:password@]host:port[,host:port...]/service_name[/db]``
  (``rediss+sentinel://`` for TLS): the master that the Sentinels at ``host:port`` name
  ``service_name``, followed through failovers. The credentials are the data nodes'; the Sentinels
  are reached without.

A port left out is 6379 (26379 for a Sentinel). IPv6 hosts go in brackets (``[::1]:7000``).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Literal
from urllib.parse import unquote

from broker.errors import ConfigError

CLUSTER_SCHEMES = {"redis+cluster": False, "rediss+cluster": True}  # scheme -> TLS
SENTINEL_SCHEMES = {"redis+sentinel": False, "rediss+sentinel": True}


@dataclass(frozen=True, slots=True)
class RedisTarget:
    """What a URL names. ``kind`` single: ``url`` is handed to redis-py as it is; cluster and
    sentinel: ``nodes`` are the startup nodes or the Sentinels, (host, port)."""

    kind: Literal["single", "cluster", "sentinel"]
    url: str
    nodes: tuple[tuple[str, int], ...] = ()
    username: str | None = None
    password: str | None = None
    tls: bool = False
    service: str | None = None  # sentinel: the master's name
    db: int = 0


def parse_url(url: str) -> RedisTarget:
    """The ``RedisTarget`` of ``url``; raises ``ConfigError`` naming what is wrong (the URL masked)."""
    scheme, sep, rest = url.partition("://")
    scheme = scheme.lower()
    if scheme not in CLUSTER_SCHEMES and scheme not in SENTINEL_SCHEMES:
        return RedisTarget("single", url)
    if not sep:
        raise ConfigError(f"not a Redis URL: {mask_url(url)!r}")
    if "?" in rest or "#" in rest:
        raise ConfigError(f"{scheme}:// takes no query options: {mask_url(url)!r}")
    netloc, _slash, path = rest.partition("/")
    username = password = None
    if "@" in netloc:
        userinfo, netloc = netloc.rsplit("@", 1)
        user, has_password, secret = userinfo.partition(":")
        username = unquote(user) or None
        password = unquote(secret) if has_password else None
    sentinel = scheme in SENTINEL_SCHEMES
    nodes = tuple(_host_port(part, 26379 if sentinel else 6379, url) for part in netloc.split(","))
    if sentinel:
        service, _, db = path.partition("/")
        if not service:
            raise ConfigError(f"{scheme}:// needs the service name after the hosts (…/mymaster): {mask_url(url)!r}")
        return RedisTarget("sentinel", url, nodes, username, password, SENTINEL_SCHEMES[scheme], unquote(service),
                           _db(db.rstrip("/"), url))
    if _db(path.rstrip("/"), url) != 0:
        raise ConfigError(f"Redis Cluster has database 0 only: {mask_url(url)!r}")
    return RedisTarget("cluster", url, nodes, username, password, CLUSTER_SCHEMES[scheme])


def _host_port(part: str, default_port: int, url: str) -> tuple[str, int]:
    if part.startswith("["):
        host, _, tail = part[1:].partition("]")
        port = tail.removeprefix(":")
    else:
        host, _, port = part.partition(":")
    if not host:
        raise ConfigError(f"a host is missing in {mask_url(url)!r}")
    try:
        return host, int(port) if port else default_port
    except ValueError:
        raise ConfigError(f"bad port {port!r} in {mask_url(url)!r}") from None


def _db(text: str, url: str) -> int:
    try:
        return int(text) if text else 0
    except ValueError:
        raise ConfigError(f"bad database number {text!r} in {mask_url(url)!r}") from None


def mask_url(url: str) -> str:
    """``url`` with its password shown as ``***``, for logs and terminals (never print a secret).

    ``redis://user:secret@host:6379/0`` -> ``redis://user:***@host:6379/0``; a URL without a password
    is returned as it is. Works for every scheme accepted (``rediss://``, ``unix://``, ``redis+cluster://``
    with several hosts); a ``password=`` query option is masked too.
    """
    masked = re.sub(r"^([a-z+]+://[^/@:]*:)[^@/]*@", r"\1***@", url, flags=re.IGNORECASE)
    return re.sub(r"([?&]password=)[^&]*", r"\1***", masked, flags=re.IGNORECASE)
