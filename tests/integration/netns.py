"""Two "hosts" on this machine: network namespaces joined by a veth pair, Redis in the root one.

::

    host A (netns)  10.X.Y.1 ──── veth: the group's link ──── 10.X.Y.2  host B (netns)
         10.X.Y.6                                                  10.X.Y.10
            │ veth                                                     │ veth
         10.X.Y.5 ──────── root namespace: redis-server, the test ──── 10.X.Y.9

Each host reaches Redis over a link of its own and the other host only over the group's link, so
the ranks' traffic can take no other way, and each host has two interfaces besides loopback (the
ranks must pick the right one). Each host's processes see a host name of their own, which resolves
nowhere. Namespaces and links get names unique to each ``TwoHosts`` and are deleted on exit,
whatever happened; deleting a namespace deletes the veth ends in it, and with them their peers.
"""

from __future__ import annotations

import os
import random
import secrets
import shutil
import subprocess
from dataclasses import dataclass
from types import TracebackType
from typing import TYPE_CHECKING

from broker.embedded import EmbeddedRedis

if TYPE_CHECKING:
    from typing_extensions import Self


class NetnsUnavailable(Exception):
    """This machine cannot make network namespaces (not root, no iproute2, a sandbox refusing)."""


@dataclass(frozen=True, slots=True)
class Host:
    name: str  # "A" or "B"
    netns: str  # also the host name its processes see
    address: str  # on the group's link
    interface: str  # the group's link's end in this namespace
    redis_url: str  # Redis, reached over this host's own link to the root namespace

    @property
    def hostname(self) -> str:
        return self.netns

    def argv(self, *command: str) -> list[str]:
        """``command`` run inside this host's namespace, under its own host name (a UTS namespace of
        its own; the name resolves nowhere, as on many real hosts). ``ip netns exec``, ``unshare``
        and ``exec`` each replace the process: the pid returned is the command's."""
        return ["ip", "netns", "exec", self.netns, "unshare", "--uts", "sh", "-c", 'hostname "$0" && exec "$@"',
                self.hostname, *command]


def _ip(*args: str) -> None:
    done = subprocess.run(["ip", *args], capture_output=True, text=True, timeout=30, check=False)
    if done.returncode != 0:
        raise NetnsUnavailable(f"ip {' '.join(args)}: {done.stderr.strip() or done.returncode}")


class _RedisOnLinks(EmbeddedRedis):
    """The embedded redis-server, bound to loopback and to the root namespace's end of each link."""

    def __init__(self, addresses: list[str]) -> None:
        super().__init__()
        self.addresses = addresses

    def _argv(self) -> list[str]:
        argv = super()._argv()
        at = argv.index("--bind") + 2
        return argv[:at] + self.addresses + argv[at:]


class TwoHosts:
    """Hosts A and B and a Redis both reach (see the module's docstring). A context manager."""

    a: Host  # set on entering
    b: Host

    def __init__(self) -> None:
        if os.geteuid() != 0:
            raise NetnsUnavailable("network namespaces need root")
        for tool in ("ip", "unshare"):
            if shutil.which(tool) is None:
                raise NetnsUnavailable(f"no {tool} on PATH (iproute2, util-linux)")
        token = secrets.token_hex(3)
        self._netns = [f"ryz-{token}-a", f"ryz-{token}-b"]
        self._link = f"rz{token}"  # + two letters: within the 15 characters of an interface name
        self.subnet = self._free_subnet()
        self.redis: _RedisOnLinks | None = None

    @staticmethod
    def _free_subnet() -> str:
        """A 10.X.Y.0/24 no interface of this machine's root namespace is on."""
        used = subprocess.run(["ip", "-4", "-o", "addr"], capture_output=True, text=True, timeout=30, check=False).stdout
        used += subprocess.run(["ip", "-4", "route"], capture_output=True, text=True, timeout=30, check=False).stdout
        while True:
            subnet = f"10.{random.randrange(100, 250)}.{random.randrange(1, 250)}"
            if f"{subnet}." not in used:
                return subnet

    def __enter__(self) -> Self:
        try:
            self._build()
        except BaseException:
            self.close()
            raise
        return self

    def _build(self) -> None:
        s, a, b, link = self.subnet, self._netns[0], self._netns[1], self._link
        for ns in (a, b):
            _ip("netns", "add", ns)
            _ip("-n", ns, "link", "set", "lo", "up")
        # the group's link: A <-> B
        _ip("link", "add", f"{link}ab", "type", "veth", "peer", "name", f"{link}ba")
        _ip("link", "set", f"{link}ab", "netns", a)
        _ip("link", "set", f"{link}ba", "netns", b)
        _ip("-n", a, "addr", "add", f"{s}.1/30", "dev", f"{link}ab")
        _ip("-n", b, "addr", "add", f"{s}.2/30", "dev", f"{link}ba")
        # each host's link to Redis: root <-> A, root <-> B
        for ns, ours, theirs, net in ((a, f"{link}ra", f"{link}ar", 4), (b, f"{link}rb", f"{link}br", 8)):
            _ip("link", "add", ours, "type", "veth", "peer", "name", theirs)
            _ip("link", "set", theirs, "netns", ns)
            _ip("addr", "add", f"{s}.{net + 1}/30", "dev", ours)
            _ip("-n", ns, "addr", "add", f"{s}.{net + 2}/30", "dev", theirs)
            _ip("link", "set", ours, "up")
            _ip("-n", ns, "link", "set", theirs, "up")
        _ip("-n", a, "link", "set", f"{link}ab", "up")
        _ip("-n", b, "link", "set", f"{link}ba", "up")
        self.redis = _RedisOnLinks([f"{s}.5", f"{s}.9"]).start()
        port = self.redis.port
        self.a = Host("A", a, f"{s}.1", f"{link}ab", f"redis://{s}.5:{port}")
        self.b = Host("B", b, f"{s}.2", f"{link}ba", f"redis://{s}.9:{port}")

    @property
    def redis_url(self) -> str:
        """Redis from the root namespace (this test process)."""
        assert self.redis is not None
        return self.redis.url

    def close(self) -> None:
        if self.redis is not None:
            self.redis.stop()
        for ns in self._netns:  # what is left of a half-built set goes too
            subprocess.run(["ip", "netns", "del", ns], capture_output=True, timeout=30, check=False)
        for end in ("ra", "rb"):  # gone with their peers already, unless a namespace never got them
            subprocess.run(["ip", "link", "del", f"{self._link}{end}"], capture_output=True, timeout=30, check=False)

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        self.close()


def netns_of(pid: int) -> str:
    """The name of the namespace process ``pid`` runs in ("" for the root one)."""
    done = subprocess.run(["ip", "netns", "identify", str(pid)], capture_output=True, text=True, timeout=30, check=False)
    return done.stdout.strip()
