"""Which interface a torchrun rank's gloo binds to: the one towards the rendezvous, unless told.
(Across two hosts with two links each: tests/integration/test_multi_host.py.)"""

from __future__ import annotations

import psutil

from gpu_workers.parallel.network import GLOO_IFNAME_ENV, Interface, choose_gloo_interface, interface_towards


def loopback() -> str:
    return next(name for name, addrs in psutil.net_if_addrs().items() if any(a.address == "127.0.0.1" for a in addrs))


def test_the_interface_holding_the_route_and_this_hosts_address_on_it() -> None:
    assert interface_towards("127.0.0.1", 29500) == Interface(loopback(), "127.0.0.1")
    assert interface_towards("127.0.0.1", 0) == Interface(loopback(), "127.0.0.1")  # a port not chosen yet


def test_a_rendezvous_that_does_not_resolve_has_no_interface() -> None:
    assert interface_towards("no-such-host.invalid", 29500) is None


def test_sets_gloo_socket_ifname_unless_the_operator_did() -> None:
    env: dict[str, str] = {}
    assert choose_gloo_interface("127.0.0.1", 29500, env) == Interface(loopback(), "127.0.0.1")
    assert env == {GLOO_IFNAME_ENV: loopback()}

    told = {GLOO_IFNAME_ENV: "eth1"}
    assert choose_gloo_interface("127.0.0.1", 29500, told) is None
    assert told == {GLOO_IFNAME_ENV: "eth1"}


def test_without_an_interface_leaves_torch_its_default() -> None:
    env: dict[str, str] = {}
    assert choose_gloo_interface("no-such-host.invalid", 29500, env) is None
    assert env == {}
