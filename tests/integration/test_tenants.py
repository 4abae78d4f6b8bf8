"""The ACL recipe of docs/OPERATIONS.md ("Tenants"), on the system Redis 7: a tenant's client cannot
read another's prompts or results, write into its reply streams, or cancel its requests; the
pipeline, under its own restricted user, serves both (issue "Shared use without trust", case 5).

The users are made by ``tenant_acl`` from the same commands the docs show (checked against them).
"""

from __future__ import annotations

import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import msgpack
import pytest
import redis

from balancer.service import Balancer
from broker.embedded import EmbeddedRedis
from broker.keys import Keys
from broker.settings import Settings
from gpu_workers.echo import EchoEngine
from gpu_workers.group import WorkerGroup
from producer.client import Client
from tests.gpu_workers.helpers import FakeMonotonic, events, finals, run_until

OPERATIONS = (Path(__file__).parents[2] / "docs" / "OPERATIONS.md").read_text()


def recipe(prefix: str) -> list[list[str]]:
    """The ACL SETUSER commands of the docs' "Tenants" block, for ``prefix`` (docs use ``ryz``)."""
    block = OPERATIONS.split("<!-- tenant-acl -->")[1]
    lines = [line.strip() for line in block.splitlines() if line.strip().startswith("ACL SETUSER")]
    assert len(lines) == 3, lines
    return [line.replace("ryz:", f"{prefix}:").split() for line in lines]


@pytest.fixture
def server(redis7_server: EmbeddedRedis) -> Iterator[EmbeddedRedis]:
    admin = redis.Redis.from_url(redis7_server.url)
    admin.flushall()
    yield redis7_server
    for user in ("ryz-app", "alice", "bob"):
        admin.acl_deluser(user)
    admin.close()


@pytest.fixture
def as_user(server: EmbeddedRedis, prefix: str) -> Callable[[str], str]:
    admin = redis.Redis.from_url(server.url)
    for command in recipe(prefix):
        admin.execute_command(*command)
    admin.close()

    def url(user: str) -> str:
        password = {"ryz-app": "APP-PASSWORD", "alice": "ALICE-PASSWORD", "bob": "BOB-PASSWORD"}[user]
        return server.url.replace("redis://", f"redis://{user}:{password}@")

    return url


def test_tenants_are_kept_apart(as_user: Callable[[str], str], prefix: str, keys: Keys, mono: FakeMonotonic) -> None:
    app = redis.Redis.from_url(as_user("ryz-app"))
    settings = Settings(prefix=prefix, balancer_block_ms=1, worker_block_ms=1)
    balancer = Balancer(app, settings=settings, name="b1", monotonic=mono, redis_uptime_s=lambda: 1e9)
    balancer.setup()
    group = WorkerGroup(app, EchoEngine(), settings=settings, name="g1", monotonic=mono)
    group.register()
    balancer.refresh_groups()

    def serve(until: Callable[[], bool]) -> None:
        run_until(lambda: (balancer.tick(), group.tick()), until, limit=200)

    alice = Client(settings=Settings(redis_url=as_user("alice"), prefix=prefix, tenant="alice"))
    bob_client = Client(settings=Settings(redis_url=as_user("bob"), prefix=prefix, tenant="bob"))
    bob = redis.Redis.from_url(as_user("bob"))
    secret = f"alice's secret {uuid.uuid4().hex}"
    kept = alice.submit(secret, max_tokens=12)
    ended = alice.submit("to be cancelled " * 4, max_tokens=40)
    assert kept.reply_to.startswith(keys.tenant_space("alice"))

    # bob cannot watch the ingress stream, nor the cancels, nor alice's replies, nor list keys
    for attempt in (lambda: bob.xread({keys.requests: "0-0"}), lambda: bob.xrange(keys.requests),
                    lambda: bob.xread({keys.cancel: "0-0"}), lambda: bob.xrange(kept.reply_to),
                    lambda: bob.xadd(kept.reply_to, {"id": kept.id, "event": "done"}),
                    lambda: bob.xrange(keys.result(kept.id)), lambda: bob.scan(0), lambda: bob.keys("*"),
                    lambda: bob.hgetall(keys.state(kept.reply_to, kept.id)), lambda: bob.get(keys.signing_key)):
        with pytest.raises(redis.exceptions.NoPermissionError):
            attempt()
    # bob may only XADD to the shared streams (a selector): not trim or delete others' requests there
    for attempt in (lambda: bob.xtrim(keys.requests, maxlen=0), lambda: bob.delete(keys.requests),
                    lambda: bob.xtrim(keys.cancel, maxlen=0), lambda: bob.delete(keys.cancel),
                    lambda: bob.xdel(keys.requests, "0-1"), lambda: bob.xadd(kept.reply_to + "x", {"a": "b"})):
        with pytest.raises(redis.exceptions.NoPermissionError):
            attempt()
    # ... and knowing alice's ids is not enough to cancel her requests
    bob.xadd(keys.cancel, {"id": kept.id})
    bob_client.cancel(kept.id)  # with bob's (wrong) token, were any remembered
    alice.cancel(ended)
    mine = bob_client.submit("bob's own", max_tokens=3)
    # nor to forge a continuation of one (the fields the pipeline signs when it moves a request)
    forged = {"id": kept.id, "prompt": "bob's words", "reply_to": kept.reply_to, "_takeover": ["g1", 1]}
    bob.xadd(keys.requests, {"payload": msgpack.packb(forged), "_sig": "00" * 32})
    # a reply_to outside what the pipeline's user may write: NOPERM, once; the error goes to the default
    bob.xadd(keys.requests, {"id": "stray", "prompt": "hi", "reply_to": "elsewhere:inbox"})

    serve(lambda: all(finals(events(app, h.reply_to)) for h in (kept, ended, mine)))
    assert alice.result(kept, timeout=5).text == secret[:12] and alice.result(kept).finish_reason == "length"
    assert alice.result(ended, timeout=5).finish_reason == "cancelled"
    assert bob_client.result(mine, timeout=5).text == "bob"
    serve(lambda: bool(finals(events(app, keys.result("stray")))))
    [stray] = finals(events(app, keys.result("stray")))
    assert stray["code"] == "invalid_request" and "NOPERM" in stray["message"]
    assert balancer.counts["invalid_request"] == 2 and not balancer.waiting  # the stray, the forgery
    [record] = events(app, keys.dead)  # the forgery: refused, its error not written on alice's stream
    assert "internal to the pipeline" in record["reason"] and record["reply_to"] == kept.reply_to
    with pytest.raises(redis.exceptions.NoPermissionError):
        bob.xrange(kept.reply_to)
    for client in (alice, bob_client):
        client.close()
