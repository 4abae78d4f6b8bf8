"""Attacks on the documented ACL recipe (docs/OPERATIONS.md, "Tenants") found by a fresh-eyes review
of issue "Shared use without trust", on the system Redis 7: a tenant that may XADD a shared stream can
trim it (MAXLEN/MINID) or close it (an explicit maximal entry id), since ACLs grant commands and
keys, not arguments. Fixed by ingress and cancel streams per tenant (broker.sources): the recipe gives
a tenant no shared stream, and what it does to its own hurts its own requests only.
"""

from __future__ import annotations

from collections.abc import Callable

import pytest
import redis

from broker.keys import Keys
from broker.settings import Settings
from producer.client import Client
from tests.gpu_workers.helpers import FakeMonotonic, events, finals, run_until
from tests.integration.test_tenants import app_pipeline, as_user, server  # noqa: F401 - fixtures

TRIMMING_XADDS = [
    ("requests", ["MAXLEN", "0"]),
    ("requests", ["MINID", "=", "9999999999999"]),
    ("cancel", ["MAXLEN", "0"]),
]


@pytest.mark.parametrize(("stream", "trim"), TRIMMING_XADDS)
def test_a_tenant_cannot_trim_the_shared_streams_through_xadd(
        as_user: Callable[[str], str], prefix: str, keys: Keys, mono: FakeMonotonic,  # noqa: F811
        stream: str, trim: list[str]) -> None:
    """Defect: the recipe keeps XTRIM and DEL off the shared streams, but lets a tenant XADD to them,
    and XADD takes MAXLEN/MINID: ``XADD ryz:requests MAXLEN 0 * id x prompt y`` from bob deletes
    every entry no balancer has read yet: alice's requests are lost without any event (on
    ``ryz:cancel``, her cancels are lost). The write-only selector must refuse trimming XADDs
    (e.g. a recipe without XADD's trim arguments is not expressible in ACL: the shared streams need
    another guard), or the pipeline must not depend on unread entries surviving.

    Repro (redis-cli on Redis 7, after the docs' three ACL SETUSER lines):
      XADD ryz:requests * id victim1 prompt secret          (as admin/alice; not read yet)
      redis-cli --user bob --pass BOB-PASSWORD XADD ryz:requests MAXLEN 0 '*' id x prompt y
      XLEN ryz:requests  -> 0 ; victim1 is never answered
    """
    app, balancer, group = app_pipeline(as_user, prefix, mono)
    alice = Client(settings=Settings(redis_url=as_user("alice"), prefix=prefix, tenant="alice"))
    bob = redis.Redis.from_url(as_user("bob"))

    if stream == "requests":
        handle = alice.submit("alice's request", max_tokens=5)
        expected = "length"
    else:
        handle = alice.submit("alice's long request " * 8, max_tokens=150)
        alice.cancel(handle)  # her cancel, on ryz:cancel, not yet read by anyone
        expected = "cancelled"
    name = keys.requests if stream == "requests" else keys.cancel
    try:
        bob.execute_command("XADD", name, *trim, "*", "id", "bob-trim", "prompt", "y")
    except redis.exceptions.NoPermissionError:
        pass  # refused: what the recipe should do
    for _ in range(100):
        if finals(events(app, handle.reply_to)):
            break
        balancer.tick()
        group.tick()
    assert [e.get("finish_reason") for e in finals(events(app, handle.reply_to))] == [expected]
    alice.close()


@pytest.mark.parametrize("stream", ["requests", "cancel"])
def test_a_tenant_cannot_exhaust_the_entry_ids_of_the_shared_streams(
        as_user: Callable[[str], str], prefix: str, keys: Keys, mono: FakeMonotonic,  # noqa: F811
        stream: str) -> None:
    """Defect: XADD with an explicit entry id is allowed by the recipe's write-only selector. bob
    XADDs the largest possible id; from then on every ``XADD ... *`` on that stream fails with
    "ERR The stream has exhausted the last possible ID", for every tenant, also after the balancer
    has read and XDELed bob's entry (the stream keeps its last id): ingress (or cancel) is closed
    for everyone until an operator deletes and re-creates the stream.

    Repro (Redis 7, after the docs' ACL SETUSER lines):
      redis-cli --user bob --pass BOB-PASSWORD XADD ryz:requests 18446744073709551615-18446744073709551615 id x prompt y
      redis-cli XADD ryz:requests '*' id victim prompt hi   -> ERR The stream has exhausted the last possible ID
    """
    app, balancer, group = app_pipeline(as_user, prefix, mono)
    bob = redis.Redis.from_url(as_user("bob"))
    name = keys.requests if stream == "requests" else keys.cancel
    try:
        bob.xadd(name, {"id": "bob-last", "prompt": "y"}, id="18446744073709551615-18446744073709551615")
    except redis.exceptions.NoPermissionError:
        pass  # refused: what the recipe should do
    for _ in range(20):
        balancer.tick()
        group.tick()
    alice = Client(settings=Settings(redis_url=as_user("alice"), prefix=prefix, tenant="alice"))
    handle = alice.submit("alice's request", max_tokens=5)  # raises ResponseError while the ids are exhausted
    alice.cancel(handle)
    for _ in range(100):
        if finals(events(app, handle.reply_to)):
            break
        balancer.tick()
        group.tick()
    assert len(finals(events(app, handle.reply_to))) == 1
    alice.close()


def test_what_a_tenant_does_to_its_own_streams_hurts_no_other(
        as_user: Callable[[str], str], prefix: str, keys: Keys, mono: FakeMonotonic) -> None:  # noqa: F811
    """bob may trim, delete or exhaust his own ingress and cancel streams (the recipe lets him): every
    balancer goes on reading alice's, and her requests and cancels are answered."""
    app, balancer, group = app_pipeline(as_user, prefix, mono)
    bob = redis.Redis.from_url(as_user("bob"))
    bob.xadd(keys.tenant_requests("bob"), {"id": "b1", "prompt": "y"})
    bob.xadd(keys.tenant_requests("bob"), {"id": "b2", "prompt": "y"}, maxlen=0, approximate=False)
    bob.xadd(keys.tenant_cancel("bob"), {"id": "b3"}, id="18446744073709551615-18446744073709551615")
    for _ in range(3):
        balancer.tick()
        group.tick()
    bob.delete(keys.tenant_requests("bob"))  # its consumer group with it
    bob.xadd(keys.tenant_requests("bob"), {"id": "b4", "prompt": "y"}, id="18446744073709551615-18446744073709551615")
    with pytest.raises(redis.exceptions.ResponseError, match="exhausted"):
        bob.xadd(keys.tenant_requests("bob"), {"id": "b5", "prompt": "y"})  # his stream alone is closed
    alice = Client(settings=Settings(redis_url=as_user("alice"), prefix=prefix, tenant="alice"))
    kept = alice.submit("alice's request", max_tokens=5)
    ended = alice.submit("alice's long request " * 8, max_tokens=150)
    alice.cancel(ended)
    run_until(lambda: (balancer.tick(), group.tick()),
              lambda: all(finals(events(app, h.reply_to)) for h in (kept, ended)), limit=100)
    assert [e.get("finish_reason") for h in (kept, ended) for e in finals(events(app, h.reply_to))] == [
        "length", "cancelled"]
    assert balancer.counts["dispatched"] >= 1
    alice.close()
