"""Entries that cannot be handled never wedge a balancer: each ends with an error where one can be
written, else sits on ``{p}:dead`` with its reason; the balancer keeps serving everything else.

Issue "Shared use without trust", cases 1 and 2 and their kinds, on the bundled Redis 6.2 and the
system Redis 7 (``any_redis``).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from typing import Any

import msgpack
import pytest
import redis

from balancer.routing import Router
from balancer.service import PUBLISHER, Balancer
from broker.dead_letter import Attempts, is_transient
from broker.keys import INGRESS_GROUP, Keys, Progress
from broker.lua import CLAIM_OWNER, DISPATCH, READ_CANCELS, READ_INGRESS
from broker.settings import Settings
from broker.signing import REFRESH_S, SigningKey
from gpu_workers.echo import EchoEngine
from gpu_workers.group import WorkerGroup
from tests.balancer.test_service import fake_group, queued, state, submit
from tests.gpu_workers.helpers import FakeMonotonic, events, finals, run_until

MakeBalancer = Callable[..., Balancer]


@pytest.fixture
def r(any_redis: redis.Redis) -> redis.Redis:
    return any_redis


@pytest.fixture
def make_settings(prefix: str) -> Callable[..., Settings]:
    def make(**overrides: Any) -> Settings:
        return Settings(prefix=prefix, **{"balancer_block_ms": 1, "worker_block_ms": 1, **overrides})

    return make


@pytest.fixture
def make_balancer(r: redis.Redis, make_settings: Callable[..., Settings], mono: FakeMonotonic) -> MakeBalancer:
    def make(name: str = "b1", **overrides: Any) -> Balancer:
        balancer = Balancer(r, settings=make_settings(**overrides), name=name, monotonic=mono,
                            redis_uptime_s=lambda: 1e9)
        balancer.setup()
        return balancer

    return make


def settled(balancer: Balancer, r: redis.Redis, keys: Keys) -> bool:
    balancer.flush_acks()
    return r.xlen(keys.requests) == 0 and r.xpending(keys.requests, INGRESS_GROUP)["pending"] == 0


def dead(r: redis.Redis, keys: Keys) -> list[dict[str, str]]:
    return events(r, keys.dead)


def one_final(r: redis.Redis, stream: str) -> dict[str, str]:
    got = finals(events(r, stream))
    assert len(got) == 1, events(r, stream)
    return got[0]


# --- case 1: deleted pending entries ---------------------------------------------------------------


@pytest.mark.parametrize("deleted", [[0], [1], [0, 1]])
def test_a_deleted_pending_entry_is_acknowledged_and_the_balancer_serves_on(
        r: redis.Redis, keys: Keys, make_balancer: MakeBalancer, mono: FakeMonotonic, deleted: list[int]) -> None:
    """Two entries read by a balancer that died, some of them XDELed by an operator: Redis 6.2's
    XAUTOCLAIM returns those as nil; 7 reports their ids apart. Either way: acknowledged, skipped."""
    first = make_balancer("b0")  # creates the consumer group
    fake_group(r, keys, "g1")
    ids = [submit(r, keys, id=f"r{i}", prompt="hi") for i in range(2)]
    r.xreadgroup(INGRESS_GROUP, "died", {keys.requests: ">"})
    for i in deleted:
        r.xdel(keys.requests, ids[i])
    del first
    for attempt in range(2):  # a restarted balancer must not wedge either
        balancer = make_balancer(f"b{attempt + 1}", claim_idle_ms=0)
        for _ in range(3):
            balancer.tick()
            mono.advance(1.0)
        assert settled(balancer, r, keys)
    assert sorted(req.id for req, _epoch in queued(r, keys, "g1")) == [f"r{i}" for i in range(2) if i not in deleted]
    submit(r, keys, id="fresh", prompt="after")
    balancer.tick()
    assert "fresh" in [req.id for req, _epoch in queued(r, keys, "g1")]


def test_an_entry_delivered_too_often_is_given_up(
        r: redis.Redis, keys: Keys, make_balancer: MakeBalancer, mono: FakeMonotonic) -> None:
    """An entry whose balancers keep dying on it (five claims) is not tried a sixth time."""
    make_balancer("b0")
    fake_group(r, keys, "g1")
    submit(r, keys, id="killer", prompt="x")
    r.xreadgroup(INGRESS_GROUP, "died", {keys.requests: ">"})
    for i in range(5):
        r.xautoclaim(keys.requests, INGRESS_GROUP, f"died{i}", 0, "0-0")
    balancer = make_balancer("b1", claim_idle_ms=0)
    balancer.tick()
    assert settled(balancer, r, keys)
    assert queued(r, keys, "g1") == []
    assert one_final(r, keys.result("killer"))["code"] == "internal"


# --- case 2: a request whose keys Redis refuses -----------------------------------------------------


def test_a_request_whose_state_key_has_another_type_ends_on_the_dead_stream(
        r: redis.Redis, keys: Keys, make_balancer: MakeBalancer, mono: FakeMonotonic) -> None:
    """What case 2's first request did to victim7 (a stream where its state lives): claims fail with
    WRONGTYPE. Tried once, then on {p}:dead with the reason; the balancer goes on serving."""
    balancer = make_balancer()
    fake_group(r, keys, "g1")
    r.xadd(keys.state(keys.result("victim7"), "victim7"), {"id": "step1", "event": "done"})
    submit(r, keys, id="victim7", prompt="hello", max_tokens=3)
    submit(r, keys, id="other", prompt="hello")
    ticks = run_until(lambda: (balancer.tick(), mono.advance(0.05)), lambda: settled(balancer, r, keys), limit=20)
    assert ticks <= 2
    [letter] = dead(r, keys)
    assert letter["id"] == "victim7" and "WRONGTYPE" in letter["reason"]
    assert balancer.counts["dead_letter"] == 1
    assert [req.id for req, _epoch in queued(r, keys, "g1")] == ["other"]
    assert not balancer.waiting


@pytest.mark.parametrize("kind", ["string", "hash", "list", "set", "zset"])
def test_reply_to_of_another_type_gets_its_error_on_the_default_stream(
        r: redis.Redis, keys: Keys, make_balancer: MakeBalancer, mono: FakeMonotonic, kind: str) -> None:
    """An existing key of another type as reply_to: the error goes to {p}:result:<id>."""
    make = {"string": lambda k: r.set(k, "v"), "hash": lambda k: r.hset(k, "f", "v"),
            "list": lambda k: r.rpush(k, "v"), "set": lambda k: r.sadd(k, "v"),
            "zset": lambda k: r.zadd(k, {"v": 1})}
    make[kind]("app:inbox")
    balancer = make_balancer()
    fake_group(r, keys, "g1")
    submit(r, keys, id="q1", prompt="x", reply_to="app:inbox")
    submit(r, keys, id="bad1", prompt="x", max_tokens="many", reply_to="app:inbox")  # invalid as well
    run_until(lambda: (balancer.tick(), mono.advance(0.05)), lambda: settled(balancer, r, keys), limit=10)
    for rid in ("q1", "bad1"):
        final = one_final(r, keys.result(rid))
        assert final["event"] == "error" and final["code"] == "invalid_request", final
        assert "reply_to" in final["message"] and kind in final["message"]
    assert r.type("app:inbox").decode() == kind
    assert queued(r, keys, "g1") == [] and dead(r, keys) == []


def test_an_exception_while_routing_one_request_ends_that_request_only(
        r: redis.Redis, keys: Keys, make_balancer: MakeBalancer, monkeypatch: pytest.MonkeyPatch) -> None:
    balancer = make_balancer()
    fake_group(r, keys, "g1")
    pick = Router.pick

    def fragile(self: Router, *, cost: int, **kw: Any) -> Any:
        if cost > 700:
            raise KeyError("routing bug")
        return pick(self, cost=cost, **kw)

    monkeypatch.setattr(Router, "pick", fragile)
    submit(r, keys, id="a", prompt="fine")
    submit(r, keys, id="b", prompt="this one breaks the router", max_tokens=777)
    submit(r, keys, id="c", prompt="fine too")
    balancer.tick()
    assert settled(balancer, r, keys)
    assert sorted(req.id for req, _ in queued(r, keys, "g1")) == ["a", "c"]
    final = one_final(r, keys.result("b"))
    assert final["code"] == "internal" and "KeyError" in final["message"]


def test_an_exception_while_validating_one_entry_ends_that_entry_only(
        r: redis.Redis, keys: Keys, make_balancer: MakeBalancer, monkeypatch: pytest.MonkeyPatch) -> None:
    from balancer import service

    parse = service.parse_request

    def fragile(fields: dict[bytes, bytes], **kw: Any) -> Any:
        if fields.get(b"prompt") == b"boom":
            raise RuntimeError("validation bug")
        return parse(fields, **kw)

    monkeypatch.setattr(service, "parse_request", fragile)
    balancer = make_balancer()
    fake_group(r, keys, "g1")
    submit(r, keys, id="a", prompt="fine")
    submit(r, keys, id="b", prompt="boom")
    balancer.tick()
    assert settled(balancer, r, keys)
    assert [req.id for req, _ in queued(r, keys, "g1")] == ["a"]
    assert one_final(r, keys.result("b"))["code"] == "internal"


@pytest.mark.parametrize("field", ["stop", "bad_words"])
def test_a_string_no_utf8_writer_accepts_ends_that_request_only(
        r: redis.Redis, keys: Keys, make_balancer: MakeBalancer, field: str) -> None:
    """A JSON escape spelling a lone surrogate (valid JSON, no UTF-8 string): refused by name at
    validation; it once failed every dispatch pipeline, so nothing after it was served, for good."""
    balancer = make_balancer()
    fake_group(r, keys, "g1")
    submit(r, keys, id="a", prompt="fine")
    submit(r, keys, id="b", prompt="hi", **{field: '["\\ud800"]'})
    submit(r, keys, id="c", prompt="fine too")
    balancer.tick()
    assert settled(balancer, r, keys)
    assert sorted(req.id for req, _ in queued(r, keys, "g1")) == ["a", "c"]
    final = one_final(r, keys.result("b"))
    assert final["code"] == "invalid_request" and f"'{field}'" in final["message"]
    submit(r, keys, id="d", prompt="after it")
    balancer.tick()
    assert sorted(req.id for req, _ in queued(r, keys, "g1")) == ["a", "c", "d"]


def test_a_request_that_cannot_be_serialized_ends_that_request_only(
        r: redis.Redis, keys: Keys, make_balancer: MakeBalancer, monkeypatch: pytest.MonkeyPatch) -> None:
    """The kind: whatever makes one request's queue entry unwritable ends that request at admission."""
    from broker.protocol import GenerationRequest

    to_wire = GenerationRequest.to_wire

    def fragile(self: GenerationRequest) -> bytes:
        if self.id == "b":
            raise TypeError("cannot serialize")
        return to_wire(self)

    monkeypatch.setattr(GenerationRequest, "to_wire", fragile)
    balancer = make_balancer()
    fake_group(r, keys, "g1")
    for rid in "abc":
        submit(r, keys, id=rid, prompt="fine")
    balancer.tick()
    assert settled(balancer, r, keys)
    assert sorted(req.id for req, _ in queued(r, keys, "g1")) == ["a", "c"]
    final = one_final(r, keys.result("b"))
    assert final["code"] == "internal" and "TypeError" in final["message"]


def test_case_2_end_to_end_with_a_real_group(
        r: redis.Redis, keys: Keys, make_balancer: MakeBalancer, make_settings: Callable[..., Settings],
        mono: FakeMonotonic) -> None:
    """The issue's commands: step1 aims its reply_to at victim7's state key; victim7 is answered."""
    balancer = make_balancer()
    group = WorkerGroup(r, EchoEngine(), settings=make_settings(), name="g1", monotonic=mono)
    group.register()
    balancer.refresh_groups()
    submit(r, keys, id="step1", prompt="hi", max_tokens=2, reply_to=keys.state(keys.result("victim7"), "victim7"))
    submit(r, keys, id="victim7", prompt="hello", max_tokens=3)

    def step() -> None:
        balancer.tick()
        group.tick()
        mono.advance(0.05)

    run_until(step, lambda: bool(finals(events(r, keys.result("victim7")))), limit=50)
    assert one_final(r, keys.result("victim7"))["event"] == "done"
    refused = one_final(r, keys.result("step1"))
    assert refused["code"] == "invalid_request" and "reply_to" in refused["message"]
    assert r.type(keys.state(keys.result("victim7"), "victim7")) == b"hash"


@pytest.mark.parametrize("invalid", [{"temperature": "-1"}, {"n": "0"}, {"max_tokens": "0"}])
def test_an_invalid_entry_with_a_waiting_requests_id_never_answers_it(
        r: redis.Redis, keys: Keys, make_balancer: MakeBalancer, invalid: dict[str, str]) -> None:
    """An invalid entry reusing the id of a request that waits (here: for a group) on the same
    stream: its error would be that request's answer and end its state, so it goes to {p}:dead."""
    balancer = make_balancer()
    submit(r, keys, id="v4", prompt="hello")
    balancer.tick()  # no group yet: v4 waits
    submit(r, keys, id="v4", prompt="hi", **invalid)
    balancer.tick()
    assert events(r, keys.result("v4")) == []
    [record] = dead(r, keys)
    assert "in use" in record["reason"] and record["reply_to"] == keys.result("v4")
    fake_group(r, keys, "g1")
    balancer.refresh_groups()
    balancer.tick()
    assert [(req.id, req.prompt) for req, _ in queued(r, keys, "g1")] == [("v4", "hello")]
    assert settled(balancer, r, keys)


def test_an_invalid_entry_holds_its_id(r: redis.Redis, keys: Keys, make_balancer: MakeBalancer) -> None:
    """Refused first, the id is still taken: a later request with it on another stream is told."""
    balancer = make_balancer()
    fake_group(r, keys, "g1")
    submit(r, keys, id="v6", prompt="hi", temperature="-1")
    balancer.tick()
    assert one_final(r, keys.result("v6"))["code"] == "invalid_request"
    submit(r, keys, id="v6", prompt="mine", reply_to="inbox:v6")
    balancer.tick()
    assert one_final(r, "inbox:v6")["code"] == "duplicate_id"
    assert queued(r, keys, "g1") == [] and settled(balancer, r, keys)


def test_a_request_sent_without_an_id_cannot_be_squatted(
        r: redis.Redis, keys: Keys, make_balancer: MakeBalancer) -> None:
    """Without 'id', the entry id is the request id: an attacker sending the id a later entry will
    get must neither answer that request nor end it (it was acked as a 'retry' of the attacker's)."""
    balancer = make_balancer()
    fake_group(r, keys, "g1")
    squatted = "9000000000000-0"
    attacker = r.xadd(keys.requests, {"id": squatted, "prompt": "PWNED"}, id="8000000000000-0").decode()
    balancer.tick()
    assert one_final(r, keys.result(attacker))["code"] == "invalid_request"
    r.xadd(keys.requests, {"prompt": "victim's question"}, id=squatted)
    balancer.tick()
    assert events(r, keys.result(squatted)) == []  # no answer but its own: it is queued, not refused
    assert [(req.id, req.prompt) for req, _ in queued(r, keys, "g1")] == [(squatted, "victim's question")]
    assert settled(balancer, r, keys)


# --- bounded retries -------------------------------------------------------------------------------------


def test_attempts_back_off_and_give_up_after_the_bound() -> None:
    attempts = Attempts(max_attempts=3, base_s=0.1)
    assert attempts.ready(b"1-0", now=0.0)
    assert not attempts.failed(b"1-0", now=0.0)
    assert not attempts.ready(b"1-0", now=0.05) and attempts.ready(b"1-0", now=0.1)
    assert not attempts.failed(b"1-0", now=0.1)
    assert not attempts.ready(b"1-0", now=0.25) and attempts.ready(b"1-0", now=0.31)
    assert attempts.failed(b"1-0", now=0.3)
    attempts.forget(b"1-0")
    assert attempts.ready(b"1-0", now=0.3) and attempts.next_retry() is None


def test_transient_errors_are_the_servers_not_the_requests() -> None:
    assert is_transient(redis.exceptions.ResponseError("LOADING Redis is loading the dataset in memory"))
    assert is_transient(redis.exceptions.ConnectionError("gone"))
    assert not is_transient(redis.exceptions.ResponseError("WRONGTYPE Operation against a key"))
    assert not is_transient(redis.exceptions.ResponseError("NOPERM this user has no permissions"))
    assert not is_transient(TypeError("A tuple item must be str"))


# --- duplicate ids ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("first_done", [False, True])
def test_a_duplicate_id_with_its_own_reply_stream_gets_duplicate_id_there(
        r: redis.Redis, keys: Keys, make_balancer: MakeBalancer, make_settings: Callable[..., Settings],
        mono: FakeMonotonic, first_done: bool) -> None:
    """In flight or finished, the first request keeps its id; the second is told, on its own stream."""
    balancer = make_balancer()
    group = WorkerGroup(r, EchoEngine(), settings=make_settings(), name="g1", monotonic=mono)
    group.register()
    balancer.refresh_groups()
    submit(r, keys, id="dup", prompt="first", max_tokens=2)
    balancer.tick()
    if first_done:
        run_until(group.tick, lambda: bool(finals(events(r, keys.result("dup")))), limit=20)
    submit(r, keys, id="dup", prompt="second", max_tokens=2, reply_to="app:mine")
    submit(r, keys, id="dup", prompt="third", max_tokens=2, reply_to="app:mine")  # and again, same stream
    run_until(lambda: (balancer.tick(), group.tick()), lambda: settled(balancer, r, keys)
              and bool(finals(events(r, keys.result("dup")))), limit=30)
    assert one_final(r, keys.result("dup"))["text"] == "fi"  # echo: the first request's first 2 tokens
    refused = events(r, "app:mine")
    assert [e["code"] for e in refused] == ["duplicate_id"]  # the third is a retry of the second
    assert "dup" in refused[0]["message"]
    assert balancer.counts["duplicate_id"] == 2


def test_a_new_request_holds_its_id_in_the_round_trip_that_claims_and_queues_it(
        r: redis.Redis, keys: Keys, make_balancer: MakeBalancer, mono: FakeMonotonic) -> None:
    """After the reads, hold + claim + queue in one round trip for a batch of new requests (the
    acks go with the next read): nothing else."""
    balancer = make_balancer()
    fake_group(r, keys, "g1")
    balancer.tick()  # registry read, stats written: not due again in this test
    batches: list[list[str]] = []  # the commands of each round trip
    real = balancer.scripts.wire.execute
    shas = {hashlib.sha1(source.encode()).hexdigest(): name for name, source in
            (("CLAIM_OWNER", CLAIM_OWNER), ("DISPATCH", DISPATCH), ("READ_INGRESS", READ_INGRESS),
             ("READ_CANCELS", READ_CANCELS))}

    def counted(batch: Any) -> list[Any]:
        batches.append([shas.get(c[1], "?") if c[0] == "EVALSHA" else c[0] for c in batch.commands])
        return real(batch)

    balancer.scripts.wire.execute = counted  # type: ignore[method-assign]
    for i in range(3):
        submit(r, keys, id=f"n{i}", prompt="x", reply_to=f"app:n{i}")
    balancer.tick()
    *reads, claims = batches
    assert all(set(read) <= {"XREADGROUP", "READ_CANCELS", "READ_INGRESS"} for read in reads), batches
    assert claims == ["SET", "GET", "CLAIM_OWNER", "DISPATCH"] * 3
    assert {r.get(keys.request_id(f"n{i}")).decode().split(" ")[1] for i in range(3)} == {"app:n0", "app:n1", "app:n2"}
    assert [q.id for q, _ in queued(r, keys, "g1")] == ["n0", "n1", "n2"]
    assert settled(balancer, r, keys)


@pytest.mark.parametrize("invalid_first", [False, True])
def test_in_one_read_a_valid_request_keeps_its_id_from_an_invalid_entry(
        r: redis.Redis, keys: Keys, make_balancer: MakeBalancer, invalid_first: bool) -> None:
    """Valid requests hold their ids before the invalid entries of the same read, whatever the
    order: an entry refused for its own faults never answers (or ends) the request it shadows."""
    balancer = make_balancer()
    fake_group(r, keys, "g1")
    sends = [lambda: submit(r, keys, id="mine", prompt="the question"),
             lambda: submit(r, keys, id="mine", prompt="x", temperature="-1")]
    for send in reversed(sends) if invalid_first else sends:
        send()
    balancer.tick()
    assert [(q.id, q.prompt) for q, _ in queued(r, keys, "g1")] == [("mine", "the question")]
    assert events(r, keys.result("mine")) == []
    [record] = dead(r, keys)
    assert "in use" in record["reason"]
    assert state(r, keys, "mine") == {"owner": "g1", "epoch": "1"}
    assert settled(balancer, r, keys)


def test_a_duplicate_claimed_in_the_same_round_trip_is_undone_and_fenced(
        r: redis.Redis, keys: Keys, make_balancer: MakeBalancer) -> None:
    """Held, claimed and queued in one round trip, a duplicate with a stream of its own was pinned
    and queued before its hold was known: its queue entry is taken back, and the balancer takes it
    over (a group that read the entry meanwhile is fenced) to publish duplicate_id."""
    balancer = make_balancer()
    fake_group(r, keys, "g1")
    submit(r, keys, id="taken", prompt="first")
    balancer.tick()
    cost = r.get(keys.group_queue_tokens("g1"))
    submit(r, keys, id="taken", prompt="second", reply_to="app:second")
    balancer.tick()
    assert [(q.prompt, e) for q, e in queued(r, keys, "g1")] == [("first", 1)]
    assert r.get(keys.group_queue_tokens("g1")) == cost  # the stray entry's cost taken off again
    [final] = finals(events(r, "app:second"))
    assert final["code"] == "duplicate_id" and len(events(r, "app:second")) == 1
    second = {k.decode(): v.decode() for k, v in r.hgetall(keys.state("app:second", "taken")).items()}
    assert (second["owner"], second["epoch"]) == (PUBLISHER, "2")  # the stray epoch-1 entry is fenced
    assert state(r, keys, "taken") == {"owner": "g1", "epoch": "1"}
    assert balancer.counts["duplicate_id"] == 1 and balancer.counts["dispatched"] == 1
    assert settled(balancer, r, keys)


def test_a_retry_on_the_same_stream_is_answered_by_the_first_request(
        r: redis.Redis, keys: Keys, make_balancer: MakeBalancer) -> None:
    balancer = make_balancer()
    fake_group(r, keys, "g1")
    submit(r, keys, id="again", prompt="x")
    submit(r, keys, id="again", prompt="x")
    balancer.tick()
    assert settled(balancer, r, keys)
    assert [req.id for req, _ in queued(r, keys, "g1")] == ["again"]
    assert events(r, keys.result("again")) == []  # nothing but what the first request's group writes


def test_a_re_read_entry_and_a_moved_request_keep_their_id(
        r: redis.Redis, keys: Keys, make_balancer: MakeBalancer) -> None:
    """The same entry processed twice (a balancer died) and failover's re-enqueued copy are no duplicates."""
    fake_group(r, keys, "g1")
    first = make_balancer("b0")
    submit(r, keys, id="mine", prompt="x")
    first.tick()  # dispatched, acknowledgement not sent: the balancer dies here
    (eid,) = [e for e, _ in r.xrange(keys.requests)]
    r.xclaim(keys.requests, INGRESS_GROUP, "dead", 0, [eid], idle=10_000, justid=True)
    heir = make_balancer("heir")
    heir.tick()
    assert settled(heir, r, keys) and heir.counts["duplicate_id"] == 0
    assert events(r, keys.result("mine")) == []


# --- forged internal fields ------------------------------------------------------------------------------


@pytest.mark.parametrize("forged", [
    {"_takeover": ["g1", 1]},  # the victim's owner and epoch: a continuation of it, with the attacker's prompt
    {"_takeover": ["g1", 1], "_enqueued_ms": 1, "_sig": "00" * 32},
    {"_enqueued_ms": 1},  # backdated: ahead of everything waiting, and past its own deadline
])
def test_a_forged_continuation_takes_nothing_over(
        r: redis.Redis, keys: Keys, make_balancer: MakeBalancer, forged: dict[str, Any]) -> None:
    """Fields only the pipeline writes (a request moved off a group) are refused from a client,
    whatever it knows of the victim: its id, reply stream, owning group and epoch."""
    balancer = make_balancer()
    fake_group(r, keys, "g1")
    balancer.refresh_groups()
    submit(r, keys, id="victim", prompt="the victim's question")
    balancer.tick()
    assert state(r, keys, "victim") == {"owner": "g1", "epoch": "1"}
    fields = {"id": "victim", "prompt": "PWNED", "reply_to": keys.result("victim"), **forged}
    signature = fields.pop("_sig", None)
    r.xadd(keys.requests, {"payload": msgpack.packb(fields), **({"_sig": signature} if signature else {})})
    r.xadd(keys.requests, {k: json.dumps(v) for k, v in forged.items() if k != "_sig"}
           | {"id": "flat", "prompt": "PWNED"})
    balancer.tick()
    assert state(r, keys, "victim") == {"owner": "g1", "epoch": "1"}  # not taken over, not fenced
    assert [(q.id, q.prompt) for q, _ in queued(r, keys, "g1")] == [("victim", "the victim's question")]
    assert events(r, keys.result("victim")) == []  # the forgery holds no id: its error went to {p}:dead
    [record] = dead(r, keys)
    assert "in use" in record["reason"] and "internal" in record["reason"]
    assert "internal to the pipeline" in one_final(r, keys.result("flat"))["message"]
    assert settled(balancer, r, keys)


def test_a_request_moved_by_the_pipeline_is_still_taken_over(
        r: redis.Redis, keys: Keys, make_balancer: MakeBalancer, mono: FakeMonotonic) -> None:
    """The same fields, signed by the pipeline (failover, drain), do take the request over."""
    balancer = make_balancer()
    fake_group(r, keys, "g1")
    balancer.refresh_groups()
    submit(r, keys, id="moving", prompt="x")
    balancer.tick()
    [(request, epoch)] = queued(r, keys, "g1")
    r.xadd(keys.requests, request.to_ingress(from_owner="g1", epoch=epoch, signing_key=r.get(keys.signing_key)))
    r.delete(keys.signing_key)  # made anew: a balancer re-reads it when a signature does not verify
    r.xadd(keys.requests, request.to_ingress(from_owner="g1", epoch=epoch, signing_key=SigningKey(r, keys).get()))
    mono.advance(REFRESH_S)
    balancer.tick()
    assert state(r, keys, "moving")["epoch"] == "2"  # the first copy took it over; the second is a no-op
    assert [e for _q, e in queued(r, keys, "g1")] == [1, 2] and dead(r, keys) == []
    assert settled(balancer, r, keys)


# --- memory: hostile sizes ------------------------------------------------------------------------------


def test_oversize_entries_are_refused_without_their_bodies_leaving_redis(
        r: redis.Redis, keys: Keys, make_balancer: MakeBalancer, monkeypatch: pytest.MonkeyPatch) -> None:
    """Past the idle read's one entry, oversize entries come to the balancer as stubs (READ_INGRESS)."""
    from balancer import ingress

    balancer = make_balancer(max_request_bytes=64 << 10, balancer_read_bytes=256 << 10)
    assert balancer._read_count == 4  # 256 KiB of entries of at most 64 KiB
    fake_group(r, keys, "g1")
    held: list[int] = []
    real = ingress.ingress_entries

    def measured(raw: Any) -> Any:
        entries = real(raw)
        held.append(sum(len(k) + len(v) for _id, f in entries for k, v in f.items()))
        return entries

    monkeypatch.setattr(ingress, "ingress_entries", measured)
    big = b"x" * (2 << 20)
    for i in range(6):
        submit(r, keys, id=f"big{i}", prompt=big, reply_to=f"app:big{i}")
    submit(r, keys, id="good", prompt="small")
    for _ in range(4):
        balancer.tick()
    assert settled(balancer, r, keys)
    assert held and max(held) < 4096  # stubs: ids and sizes, never the 2 MiB prompts
    for i in range(6):
        final = one_final(r, f"app:big{i}")
        assert final["code"] == "invalid_request" and "over the limit" in final["message"]
    assert [req.id for req, _ in queued(r, keys, "g1")] == ["good"]


def test_the_read_batch_is_bounded_in_bytes(make_balancer: MakeBalancer) -> None:
    assert make_balancer(max_request_bytes=1 << 20, balancer_read_bytes=8 << 20)._read_count == 8
    assert make_balancer(max_request_bytes=1 << 20, balancer_read_bytes=1)._read_count == 1
    assert make_balancer(max_request_bytes=1 << 10, balancer_batch_max=100)._read_count == 100


# --- cancel tokens ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("where", ["balancer", "group"])
def test_only_the_owners_cancel_ends_a_request_sent_with_a_token(
        r: redis.Redis, keys: Keys, make_balancer: MakeBalancer, make_settings: Callable[..., Settings],
        mono: FakeMonotonic, where: str) -> None:
    """Knowing the id is not enough: the cancel must carry the request's cancel_token; old-form
    requests (no token) stay cancellable by id."""
    balancer = make_balancer()
    group = WorkerGroup(r, EchoEngine(), settings=make_settings(echo_token_delay_ms=0), name="g1", monotonic=mono)
    group.register()
    balancer.refresh_groups()
    if where == "balancer":  # the cancels arrive before the requests are dispatched
        r.xadd(keys.cancel, {"id": "victim"})
        r.xadd(keys.cancel, {"id": "victim", "token": "guessed"})
        r.xadd(keys.cancel, {"id": "mine", "token": "s3cret"})
        r.xadd(keys.cancel, {"id": "old"})
    submit(r, keys, id="victim", prompt="x" * 20, max_tokens=12, cancel_token="v-secret")
    submit(r, keys, id="mine", prompt="x" * 20, max_tokens=12, cancel_token="s3cret")
    submit(r, keys, id="old", prompt="x" * 20, max_tokens=12)
    balancer.tick()
    if where == "group":  # admitted by the group first, then the cancels
        group.tick()
        r.xadd(keys.cancel, {"id": "victim"})
        r.xadd(keys.cancel, {"id": "victim", "token": "guessed"})
        r.xadd(keys.cancel, {"id": "mine", "token": "s3cret"})
        r.xadd(keys.cancel, {"id": "old"})
    run_until(lambda: (balancer.tick(), group.tick()),
              lambda: all(finals(events(r, keys.result(i))) for i in ("victim", "mine", "old")), limit=100)
    reasons = {i: one_final(r, keys.result(i)).get("finish_reason") for i in ("victim", "mine", "old")}
    assert reasons == {"victim": "length", "mine": "cancelled", "old": "cancelled"}


def test_a_failure_that_may_pass_is_retried_with_backoff_then_given_up(
        r: redis.Redis, keys: Keys, make_balancer: MakeBalancer, mono: FakeMonotonic) -> None:
    """A claim answered BUSY (a server-side condition, not the request's fault) for one request: it
    is tried again only after its backoff, MAX_ATTEMPTS times in all, then ends with its error."""
    balancer = make_balancer()
    fake_group(r, keys, "g1")
    claim = balancer.scripts.claim_owner
    tries: list[float] = []

    def flaky(*, progress: Progress, client: Any = None, **named: Any) -> Any:
        if "flaky" in progress.state:
            tries.append(mono())
            return client._add(("EVAL", "return redis.error_reply('BUSY simulated')", 0))
        return claim(progress=progress, client=client, **named)

    balancer.scripts.claim_owner = flaky  # type: ignore[method-assign]
    submit(r, keys, id="flaky", prompt="x")
    submit(r, keys, id="fine", prompt="x")
    ticks = run_until(lambda: (balancer.tick(), mono.advance(0.02), fake_group(r, keys, "g1")),
                      lambda: bool(finals(events(r, keys.result("flaky")))), limit=60)
    assert len(tries) == 3 and ticks >= 15  # MAX_ATTEMPTS, over 0.3 s of ticks every 20 ms: not once per tick
    assert tries[1] - tries[0] >= 0.1 and tries[2] - tries[1] >= 0.2  # the backoff doubles
    final = one_final(r, keys.result("flaky"))
    assert final["code"] == "internal" and "BUSY" in final["message"]
    assert [req.id for req, _ in queued(r, keys, "g1")] == ["fine"]
    assert settled(balancer, r, keys) and not balancer.waiting
