"""Which network interface a rank's collectives use.

gloo binds each rank to one address and tells its peers to connect there. Unless told
(``GLOO_SOCKET_IFNAME``), torch takes the address the host name resolves to, which on many hosts is
a loopback one (Debian's ``127.0.1.1``, a container's ``127.0.0.1`` entry in /etc/hosts): fine on one
host, unreachable from every other. A rank started by torchrun therefore picks the interface it
reaches the rendezvous (``MASTER_ADDR``) through, the one the kernel routes that address from: the
network the group's hosts share by construction. ``GLOO_SOCKET_IFNAME``, when set, wins.
"""

from __future__ import annotations

import logging
import socket
from collections.abc import MutableMapping
from dataclasses import dataclass

import psutil

log = logging.getLogger(__name__)

GLOO_IFNAME_ENV = "GLOO_SOCKET_IFNAME"


@dataclass(frozen=True, slots=True)
class Interface:
    name: str  # e.g. "eth0"
    address: str  # this host's address on it that reaches the peer


def interface_towards(host: str, port: int) -> Interface | None:
    """The interface (and this host's address on it) that traffic to ``host`` leaves from; ``host``
    may be this host's own address (the interface that holds it). None if ``host`` does not resolve,
    has no route, or the source address belongs to no interface (e.g. a NAT'd sandbox).

    A connected UDP socket sends nothing: connecting only asks the kernel's routing for the source
    address (the technique of ``ip route get``)."""
    try:
        family, _, _, _, sockaddr = socket.getaddrinfo(host, port, type=socket.SOCK_DGRAM)[0]
        with socket.socket(family, socket.SOCK_DGRAM) as sock:
            sock.connect(sockaddr)
            source = str(sock.getsockname()[0])
    except OSError:
        return None
    for name, addresses in psutil.net_if_addrs().items():
        if any(a.address.split("%")[0] == source for a in addresses):  # IPv6 link-local carries %iface
            return Interface(name, source)
    return None


def choose_gloo_interface(master_addr: str, master_port: int,
                          environ: MutableMapping[str, str]) -> Interface | None:
    """Set ``GLOO_SOCKET_IFNAME`` in ``environ`` to the interface towards the rendezvous, unless it is
    set already; returns the interface chosen (None: left to torch's default, with a warning)."""
    if environ.get(GLOO_IFNAME_ENV):
        return None
    chosen = interface_towards(master_addr, master_port)
    if chosen is None:
        log.warning("no interface found towards the rendezvous %s:%d; gloo uses the address the host name "
                    "resolves to (set %s if peers cannot connect)", master_addr, master_port, GLOO_IFNAME_ENV)
        return None
    environ[GLOO_IFNAME_ENV] = chosen.name
    log.info("collectives over %s (%s), the interface towards the rendezvous %s:%d",
             chosen.name, chosen.address, master_addr, master_port)
    return chosen
