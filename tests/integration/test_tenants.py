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
from broker.sources import tenant_acl
from gpu_workers.echo import EchoEngine
from gpu_workers.group import WorkerGroup
from producer.client import Client
from ryzanstein.cli import main
from tests.gpu_workers.helpers import FakeMonotonic, events, finals, run_until

OPERATIONS = (Path(__file__).parents[2] / "docs" / "OPERATIONS.md").read_text()


def recipe(prefix: str) -> list[list[str]]:
    """The commands of the docs' "Tenants" block (three ACL SETUSER, the SADD of the tenants), for
    ``prefix`` (docs use ``ryz``)."""
    block = OPERATIONS.split("<!-- tenant-acl -->")[1]
    lines = [line.strip() for line in block.splitlines() if line.strip().startswith(("ACL SETUSER", "SADD"))]
    assert len(lines) == 4, lines
    return [line.replace("ryz:", f"{prefix}:").split() for line in lines]


def test_the_cli_prints_the_recipe_of_the_docs() -> None:
    """``ryzanstein tenant add`` prints the docs' line for the tenant (broker.sources.tenant_acl)."""
    documented = [" ".join(command) for command in recipe("ryz")]
    assert tenant_acl(Keys("ryz"), "alice", "ALICE-PASSWORD") in documented
    assert tenant_acl(Keys("ryz"), "bob", "BOB-PASSWORD") in documented
    assert "SADD ryz:tenants alice bob" in documented


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


def test_the_cli_applies_and_deletes_a_tenants_user(server: EmbeddedRedis, prefix: str, keys: Keys) -> None:
    common = ["--redis-url", server.url, "--prefix", prefix]
    assert main(["tenant", "add", "carol", "--password", "CAROL-PW", "--apply", *common]) == 0
    carol = redis.Redis.from_url(server.url.replace("redis://", "redis://carol:CAROL-PW@"))
    carol.xadd(keys.tenant_requests("carol"), {"id": "c1", "prompt": "hi"})
    with pytest.raises(redis.exceptions.NoPermissionError):
        carol.xadd(keys.requests, {"id": "c2", "prompt": "hi"})
    assert main(["tenant", "add", "default", "--apply", *common]) == 2  # Redis's own user: never rewritten
    assert main(["tenant", "remove", "carol", "--apply", *common]) == 0
    with pytest.raises(redis.exceptions.AuthenticationError):
        redis.Redis.from_url(server.url.replace("redis://", "redis://carol:CAROL-PW@")).ping()


def app_pipeline(as_user: Callable[[str], str], prefix: str,
                 mono: FakeMonotonic) -> tuple[redis.Redis, Balancer, WorkerGroup]:
    """A balancer and an echo group logged in as the recipe's ``ryz-app`` user, set up and known to
    each other: the pipeline tenants' clients talk to."""
    app = redis.Redis.from_url(as_user("ryz-app"))
    settings = Settings(prefix=prefix, balancer_block_ms=1, worker_block_ms=1)
    balancer = Balancer(app, settings=settings, name="b1", monotonic=mono, redis_uptime_s=lambda: 1e9)
    balancer.setup()
    group = WorkerGroup(app, EchoEngine(), settings=settings, name="g1", monotonic=mono)
    group.register()
    balancer.refresh_groups()
    return app, balancer, group


def test_tenants_are_kept_apart(as_user: Callable[[str], str], server: EmbeddedRedis, prefix: str, keys: Keys,
                                mono: FakeMonotonic) -> None:
    app, balancer, group = app_pipeline(as_user, prefix, mono)

    def serve(until: Callable[[], bool]) -> None:
        run_until(lambda: (balancer.tick(), group.tick()), until, limit=200)

    alice = Client(settings=Settings(redis_url=as_user("alice"), prefix=prefix, tenant="alice"))
    bob_client = Client(settings=Settings(redis_url=as_user("bob"), prefix=prefix, tenant="bob"))
    bob = redis.Redis.from_url(as_user("bob"))
    alice_raw = redis.Redis.from_url(as_user("alice"))
    secret = f"alice's secret {uuid.uuid4().hex}"
    kept = alice.submit(secret, max_tokens=12)
    ended = alice.submit("to be cancelled " * 4, max_tokens=40)
    assert kept.reply_to.startswith(keys.tenant_space("alice")) and alice.requests_stream == keys.tenant_requests("alice")
    # a request without a cancel token, sent as redis-cli would: its tenant is its stream's
    alice_raw.xadd(keys.tenant_requests("alice"), {"id": "a-raw", "prompt": "no token " * 4, "max_tokens": "30"})

    # bob cannot watch any ingress stream, nor the cancels, nor alice's replies, nor list keys
    for attempt in (lambda: bob.xread({keys.requests: "0-0"}), lambda: bob.xrange(keys.requests),
                    lambda: bob.xread({keys.tenant_requests("alice"): "0-0"}),
                    lambda: bob.xrange(keys.tenant_cancel("alice")),
                    lambda: bob.xread({keys.cancel: "0-0"}), lambda: bob.xrange(kept.reply_to),
                    lambda: bob.xadd(kept.reply_to, {"id": kept.id, "event": "done"}),
                    lambda: bob.xrange(keys.result(kept.id)), lambda: bob.scan(0), lambda: bob.keys("*"),
                    lambda: bob.hgetall(keys.state(kept.reply_to, kept.id)), lambda: bob.get(keys.signing_key),
                    lambda: bob.smembers(keys.tenants), lambda: bob.sadd(keys.tenants, "mallory")):
        with pytest.raises(redis.exceptions.NoPermissionError):
            attempt()
    # bob writes no shared stream and no stream of alice's: he can neither trim nor close them
    for attempt in (lambda: bob.xadd(keys.requests, {"id": "x", "prompt": "y"}),
                    lambda: bob.xadd(keys.cancel, {"id": kept.id}),
                    lambda: bob.xadd(keys.tenant_requests("alice"), {"id": "x", "prompt": "y"}),
                    lambda: bob.xadd(keys.tenant_cancel("alice"), {"id": "a-raw"}),
                    lambda: bob.xtrim(keys.requests, maxlen=0), lambda: bob.delete(keys.requests),
                    lambda: bob.xtrim(keys.cancel, maxlen=0), lambda: bob.delete(keys.cancel),
                    lambda: bob.xdel(keys.requests, "0-1"), lambda: bob.xadd(kept.reply_to + "x", {"a": "b"})):
        with pytest.raises(redis.exceptions.NoPermissionError):
            attempt()
    # ... and knowing alice's ids is not enough to cancel her requests: his cancels are his tenant's
    bob.xadd(keys.tenant_cancel("bob"), {"id": kept.id})
    bob.xadd(keys.tenant_cancel("bob"), {"id": "a-raw"})
    bob_client.cancel(kept.id)  # with bob's (wrong) token, were any remembered
    alice.cancel(ended)
    mine = bob_client.submit("bob's own", max_tokens=3)
    # nor to forge a continuation of one (the fields the pipeline signs when it moves a request)
    forged = {"id": kept.id, "prompt": "bob's words", "reply_to": kept.reply_to, "_takeover": ["g1", 1]}
    bob.xadd(keys.tenant_requests("bob"), {"payload": msgpack.packb(forged), "_sig": "00" * 32})
    # nor to have events written outside his space: refused, the error on his own default stream
    bob.xadd(keys.tenant_requests("bob"), {"id": "stray", "prompt": "hi", "reply_to": keys.client_replies("x", tenant="alice")})
    # a trusted user's reply_to outside what the pipeline's user may write: NOPERM, once; the error goes to the default
    admin = redis.Redis.from_url(server.url)
    admin.xadd(keys.requests, {"id": "stray2", "prompt": "hi", "reply_to": "elsewhere:inbox"})

    serve(lambda: all(finals(events(app, h.reply_to)) for h in (kept, ended, mine)))
    assert alice.result(kept, timeout=5).text == secret[:12] and alice.result(kept).finish_reason == "length"
    assert alice.result(ended, timeout=5).finish_reason == "cancelled"
    assert bob_client.result(mine, timeout=5).text == "bob"
    raw_reply = keys.reply_stream("a-raw", tenant="alice")
    serve(lambda: bool(finals(events(app, raw_reply))))
    assert [e["finish_reason"] for e in finals(events(app, raw_reply))] == ["length"]  # not cancelled by bob
    [stray] = finals(events(app, keys.reply_stream("stray", tenant="bob")))
    assert stray["code"] == "invalid_request" and "tenant" in stray["message"]
    assert not admin.exists(keys.client_replies("x", tenant="alice"))
    serve(lambda: bool(finals(events(app, keys.result("stray2")))))
    [stray2] = finals(events(app, keys.result("stray2")))
    assert stray2["code"] == "invalid_request" and "NOPERM" in stray2["message"]
    assert balancer.counts["invalid_request"] == 3 and not balancer.waiting  # the strays, the forgery
    # the forgery: refused, its error on bob's own stream (its tenant's), none on alice's
    [forgery] = events(app, keys.reply_stream(kept.id, tenant="bob"))
    assert forgery["code"] == "invalid_request" and "internal to the pipeline" in forgery["message"]
    assert [e["event"] for e in events(app, kept.reply_to)] == ["done"] and events(app, keys.dead) == []
    with pytest.raises(redis.exceptions.NoPermissionError):
        bob.xrange(kept.reply_to)
    for client in (alice, bob_client):
        client.close()
