"""WorkerGroup with the echo engine on the real test Redis, driven tick by tick."""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from typing import Any

import pytest
import redis

from broker.events import token_event
from broker.keys import QUEUE_GROUP, Keys
from broker.registry import read_groups
from broker.scripts import Scripts, claim_result
from broker.settings import Settings
from broker.validation import parse_request
from gpu_workers.echo import EchoEngine
from gpu_workers.group import CONSUMER, GroupState, WorkerGroup
from gpu_workers.sampling_params import EngineRequestError
from tests.gpu_workers.helpers import (
    FakeClock,
    FakeMonotonic,
    assert_one_clean_completion,
    dispatch,
    enqueue,
    events,
    finals,
    make_request,
    pending,
    queue_fields,
    run_until,
    state_key,
    take_over,
    tokens,
)

MakeGroup = Callable[..., WorkerGroup]


@pytest.fixture
def make_group(r: redis.Redis, redis_url: str, prefix: str, mono: FakeMonotonic) -> MakeGroup:
    def make(name: str = "g1", *, engine: EchoEngine | None = None, register: bool = True,
             **overrides: Any) -> WorkerGroup:
        settings = Settings(redis_url=redis_url, prefix=prefix, worker_block_ms=1, **overrides)
        group = WorkerGroup(r, engine or EchoEngine(), settings=settings, name=name, monotonic=mono)
        if register:
            group.register()
        return group

    return make


def finished(r: redis.Redis, *streams: str) -> Callable[[], bool]:
    return lambda: all(finals(events(r, s)) for s in streams)


# --- registration and heartbeat -------------------------------------------------------------------


def test_register_publishes_heartbeat_and_accepting_flag(
        r: redis.Redis, keys: Keys, make_group: MakeGroup) -> None:
    group = make_group("g1", engine=EchoEngine(max_context=512))
    assert r.get(keys.group_accepting("g1")) == b"1"
    assert r.zscore(keys.groups, "g1") is not None
    assert [g["name"] for g in r.xinfo_groups(keys.group_queue("g1"))] == [QUEUE_GROUP.encode()]
    (status,) = read_groups(r, keys, dead_after_s=3.0)
    assert status.name == "g1" and status.alive and status.routable
    assert (status.model, status.vocab_size, status.max_context, status.tp) == ("echo", 256, 512, 1)
    assert status.state == "ready" and status.leader_pid == os.getpid()
    assert (status.running, status.waiting, status.queue_depth) == (0, 0, 0)
    assert status.heartbeat_age_s < 3.0
    assert group.name == "g1"


def test_heartbeat_is_rate_limited_and_reports_load(r: redis.Redis, keys: Keys, make_group: MakeGroup,
                                                    mono: FakeMonotonic) -> None:
    group = make_group("g1", heartbeat_interval_s=1.0, worker_max_batch=2)
    for n in range(3):
        enqueue(r, keys, "g1", make_request(keys, f"r{n}", "long enough prompt"))
    group.tick()  # reads two (max batch), leaves one queued
    assert read_groups(r, keys, dead_after_s=3.0)[0].running == 0  # the interval has not passed
    mono.advance(1.0)
    group.tick()
    status = read_groups(r, keys, dead_after_s=3.0)[0]
    assert (status.running, status.queue_depth) == (2, 1)


# --- serving --------------------------------------------------------------------------------------


def test_request_gets_indexed_tokens_then_one_done_and_is_acked_only_after(
        r: redis.Redis, keys: Keys, make_group: MakeGroup) -> None:
    group = make_group()
    prompt = "héllo 🦀!"
    request = make_request(keys, "req-1", prompt)
    enqueue(r, keys, "g1", request)
    reply = keys.result("req-1")
    ticks = 0
    while not finals(events(r, reply)):
        # until its final event is written, the queue entry stays (read and unacked, or unread)
        assert r.xlen(keys.group_queue("g1")) == 1
        group.tick()
        ticks += 1
        assert ticks < 100
    assert r.xlen(keys.group_queue("g1")) == 0 and pending(r, keys, "g1") == 0
    group.tick()
    evs = events(r, reply)
    done = assert_one_clean_completion(evs, text=prompt)
    n = len(prompt.encode())
    assert len(tokens(evs)) == n
    assert json.loads(done["token_ids"]) == list(prompt.encode())
    assert done["finish_reason"] == "stop"
    assert (done["prompt_tokens"], done["completion_tokens"]) == (str(n), str(n))
    assert all(e["id"] == "req-1" for e in evs)
    assert group.held == {} and not group.engine.has_work() and group.completed == 1
    # the reply stream and the state expire
    assert 0 < r.pttl(reply) <= group.settings.result_ttl_s * 1000
    assert 0 < r.pttl(state_key(keys, request)) <= group.settings.result_ttl_s * 1000


def test_non_streaming_request_gets_only_the_done_event(
        r: redis.Redis, keys: Keys, make_group: MakeGroup) -> None:
    group = make_group()
    enqueue(r, keys, "g1", make_request(keys, "a", "quiet", stream=False))
    run_until(group.tick, finished(r, keys.result("a")))
    evs = events(r, keys.result("a"))
    assert len(evs) == 1
    assert assert_one_clean_completion(evs, text="quiet", stream=False)["finish_reason"] == "stop"


def test_max_tokens_and_stop_strings(r: redis.Redis, keys: Keys, make_group: MakeGroup) -> None:
    group = make_group()
    enqueue(r, keys, "g1", make_request(keys, "short", "abcdefgh", max_tokens=3))
    enqueue(r, keys, "g1", make_request(keys, "stopped", "say hi STOP and more", stop=["STOP", "and"]))
    run_until(group.tick, finished(r, keys.result("short"), keys.result("stopped")))
    short = assert_one_clean_completion(events(r, keys.result("short")), text="abc")
    assert short["finish_reason"] == "length"
    stopped = assert_one_clean_completion(events(r, keys.result("stopped")), text="say hi ")
    assert stopped["finish_reason"] == "stop"
    assert json.loads(stopped["token_ids"]) == list(b"say hi STOP")
    assert not group.engine.has_work() and group.held == {}


def test_many_requests_to_one_client_stream(r: redis.Redis, keys: Keys, make_group: MakeGroup) -> None:
    group = make_group()
    shared = keys.client_replies("c1")
    prompts = {f"m{n}": "x" * (n + 1) + "yz" for n in range(5)}
    for rid, prompt in prompts.items():
        enqueue(r, keys, "g1", make_request(keys, rid, prompt, reply_to=shared))
    group.tick()
    run_until(group.tick, lambda: not group.held)
    evs = events(r, shared)
    for rid, prompt in prompts.items():
        assert_one_clean_completion([e for e in evs if e["id"] == rid], text=prompt)
    assert not r.exists(keys.result("m0"))


def test_invalid_requests_get_invalid_request_and_never_reach_the_engine(
        r: redis.Redis, keys: Keys, make_group: MakeGroup) -> None:
    group = make_group(engine=EchoEngine(max_context=16))
    enqueue(r, keys, "g1", make_request(keys, "vocab", prompt_ids=[1, 300, 2]))
    enqueue(r, keys, "g1", make_request(keys, "context", "0123456789", max_tokens=7))
    enqueue(r, keys, "g1", make_request(keys, "fine", "0123456789", max_tokens=6))
    added: list[str] = []
    real_add = group.engine.add
    group.engine.add = (  # type: ignore[method-assign]
        lambda req: (added.append(req.request_id), real_add(req))[1])
    run_until(group.tick, finished(r, *(keys.result(x) for x in ("vocab", "context", "fine"))))
    assert added == ["fine"]
    for rid, words in (("vocab", "vocabulary"), ("context", "context length")):
        evs = events(r, keys.result(rid))
        assert len(evs) == 1 and evs[0]["event"] == "error" and evs[0]["code"] == "invalid_request", evs
        assert words in evs[0]["message"]
    assert assert_one_clean_completion(events(r, keys.result("fine")))["finish_reason"] == "length"
    assert r.xlen(keys.group_queue("g1")) == 0 and pending(r, keys, "g1") == 0


def test_malformed_queue_entry_is_dropped_without_stopping_the_group(
        r: redis.Redis, keys: Keys, make_group: MakeGroup) -> None:
    group = make_group()
    r.xadd(keys.group_queue("g1"), {"r": b"\xc1 not msgpack", "e": "1"})
    enqueue(r, keys, "g1", make_request(keys, "ok", "fine"))
    run_until(group.tick, finished(r, keys.result("ok")))
    assert_one_clean_completion(events(r, keys.result("ok")), text="fine")
    assert r.xlen(keys.group_queue("g1")) == 0 and pending(r, keys, "g1") == 0


# --- cancel and timeout ---------------------------------------------------------------------------


def test_cancel_mid_generation_ends_with_cancelled(r: redis.Redis, keys: Keys, make_group: MakeGroup) -> None:
    group = make_group()
    enqueue(r, keys, "g1", make_request(keys, "c", "a fairly long prompt to echo back"))
    enqueue(r, keys, "g1", make_request(keys, "other", "keep going"))
    for _ in range(3):
        group.tick()
    r.xadd(keys.cancel, {"id": "c"})
    group.tick()
    evs = events(r, keys.result("c"))
    done = assert_one_clean_completion(evs, text="a f")
    assert done["finish_reason"] == "cancelled" and json.loads(done["token_ids"]) == list(b"a f")
    assert len(tokens(evs)) == 3
    run_until(group.tick, finished(r, keys.result("other")))
    assert events(r, keys.result("c")) == evs  # nothing after the final
    assert_one_clean_completion(events(r, keys.result("other")), text="keep going")
    assert r.xlen(keys.group_queue("g1")) == 0 and not group.engine.has_work()


def test_cancel_that_arrives_before_the_request_is_read(
        r: redis.Redis, keys: Keys, make_group: MakeGroup) -> None:
    group = make_group()
    r.xadd(keys.cancel, {"id": "early"})
    enqueue(r, keys, "g1", make_request(keys, "early", "never generated"))
    group.tick()
    evs = events(r, keys.result("early"))
    assert len(evs) == 1 and evs[0]["finish_reason"] == "cancelled" and evs[0]["token_ids"] == "[]"
    assert not group.engine.has_work() and r.xlen(keys.group_queue("g1")) == 0


def test_cancel_sent_before_the_group_started_is_not_applied(
        r: redis.Redis, keys: Keys, make_group: MakeGroup) -> None:
    r.xadd(keys.cancel, {"id": "old"})  # a stale cancellation of an earlier request with this id
    group = make_group()
    enqueue(r, keys, "g1", make_request(keys, "old", "hi"))
    run_until(group.tick, finished(r, keys.result("old")))
    assert finals(events(r, keys.result("old")))[0]["finish_reason"] == "stop"


def test_deadline_passing_mid_generation_ends_with_timeout(
        r: redis.Redis, keys: Keys, make_group: MakeGroup) -> None:
    group = make_group()
    t0 = 1_700_000_000_000
    group.clock = FakeClock(t0 + 500)  # type: ignore[assignment]
    enqueue(r, keys, "g1", make_request(keys, "slow", "x" * 40, timeout_s=2.0, enqueued_ms=t0))
    enqueue(r, keys, "g1", make_request(keys, "patient", "y" * 40, enqueued_ms=t0))
    for _ in range(4):
        group.tick()
    assert not finals(events(r, keys.result("slow")))
    group.clock.ms = t0 + 1999
    group.tick()
    assert not finals(events(r, keys.result("slow")))
    group.clock.ms = t0 + 2000
    group.tick()
    evs = events(r, keys.result("slow"))
    final = assert_one_clean_completion(evs)
    assert final["event"] == "error" and final["code"] == "timeout"
    assert len(tokens(evs)) == 5
    run_until(group.tick, finished(r, keys.result("patient")))
    assert events(r, keys.result("slow")) == evs
    assert_one_clean_completion(events(r, keys.result("patient")), text="y" * 40)
    assert r.xlen(keys.group_queue("g1")) == 0 and pending(r, keys, "g1") == 0


# --- ownership: fencing, re-delivery, recovery ----------------------------------------------------


@pytest.mark.parametrize("stream", [True, False])
def test_taken_over_request_is_fenced(
        r: redis.Redis, keys: Keys, make_group: MakeGroup, stream: bool) -> None:
    group = make_group()
    request = make_request(keys, "moved", "a prompt of some length", stream=stream)
    epoch = enqueue(r, keys, "g1", request)
    group.tick()
    group.tick()
    before = events(r, request.reply_to)
    assert len(before) == (2 if stream else 0)
    assert take_over(r, keys, request, to="g2", frm="g1", epoch=epoch) == ("g2", epoch + 1)
    run_until(group.tick, lambda: not group.held)
    group.tick()  # idle ticks block on the queue (~0.1 s each on a hz=10 server): keep them few
    assert events(r, request.reply_to) == before  # the old owner wrote nothing more, no final
    assert r.xlen(keys.group_queue("g1")) == 0 and pending(r, keys, "g1") == 0
    assert not group.engine.has_work() and group.completed == 0


def test_same_entry_delivered_twice_at_one_epoch_runs_once(r: redis.Redis, keys: Keys,
                                                           make_group: MakeGroup) -> None:
    group = make_group()
    request = make_request(keys, "twice", "abc")
    epoch = enqueue(r, keys, "g1", request)
    r.xadd(keys.group_queue("g1"), queue_fields(r, keys, request, epoch))  # a duplicate dispatch
    run_until(group.tick, finished(r, request.reply_to))
    run_until(group.tick, lambda: not group.held)
    assert_one_clean_completion(events(r, request.reply_to), text="abc")
    assert r.xlen(keys.group_queue("g1")) == 0 and pending(r, keys, "g1") == 0


def test_newer_epoch_of_a_held_request_replaces_it_without_duplicate_tokens(
        r: redis.Redis, keys: Keys, make_group: MakeGroup) -> None:
    group = make_group()
    request = make_request(keys, "again", "0123456789")
    epoch = enqueue(r, keys, "g1", request)
    for _ in range(4):
        group.tick()
    # handed back and routed to the same group again (a new epoch)
    assert take_over(r, keys, request, to="g1", frm="g1", epoch=epoch) == ("g1", epoch + 1)
    r.xadd(keys.group_queue("g1"), queue_fields(r, keys, request, epoch + 1))
    run_until(group.tick, finished(r, request.reply_to))
    assert_one_clean_completion(events(r, request.reply_to), text="0123456789")
    assert r.xlen(keys.group_queue("g1")) == 0 and pending(r, keys, "g1") == 0


def test_restarted_group_recovers_what_its_predecessor_left_unfinished(
        r: redis.Redis, keys: Keys, make_group: MakeGroup) -> None:
    first = make_group("g1")
    requests = [make_request(keys, f"rec{n}", f"recover me {n} please") for n in range(3)]
    for request in requests:
        enqueue(r, keys, "g1", request)
    for _ in range(5):
        first.tick()
    assert all(len(tokens(events(r, q.reply_to))) == 5 for q in requests)
    assert pending(r, keys, "g1") == 3
    # `first` dies here; a new process of the same group starts
    second = make_group("g1")
    assert set(second.held) == {q.id for q in requests}
    run_until(second.tick, finished(r, *(q.reply_to for q in requests)))
    for request in requests:
        assert_one_clean_completion(events(r, request.reply_to), text=request.prompt)
    assert r.xlen(keys.group_queue("g1")) == 0 and pending(r, keys, "g1") == 0


def test_recovery_of_entries_read_but_never_started(
        r: redis.Redis, keys: Keys, make_group: MakeGroup) -> None:
    make_group("g1")
    request = make_request(keys, "read-only", "was read, then the leader died")
    enqueue(r, keys, "g1", request)
    read = r.xreadgroup(QUEUE_GROUP, CONSUMER, {keys.group_queue("g1"): ">"})
    assert len(read[0][1]) == 1
    again = make_group("g1")
    run_until(again.tick, finished(r, request.reply_to))
    assert_one_clean_completion(events(r, request.reply_to), text=request.prompt)
    assert pending(r, keys, "g1") == 0


def test_recovery_after_final_written_but_not_acked(
        r: redis.Redis, keys: Keys, make_group: MakeGroup) -> None:
    first = make_group("g1")
    request = make_request(keys, "almost", "done")
    enqueue(r, keys, "g1", request)
    first.queue.ack = lambda entry_ids: None  # type: ignore[method-assign]  # dies between publish and ack
    run_until(first.tick, finished(r, request.reply_to))
    assert pending(r, keys, "g1") == 1
    second = make_group("g1")
    assert set(second.held) == {"almost"}
    run_until(second.tick, lambda: not second.held)
    assert_one_clean_completion(events(r, request.reply_to), text="done")
    assert r.xlen(keys.group_queue("g1")) == 0 and pending(r, keys, "g1") == 0
    assert second.completed == 0


# --- draining -------------------------------------------------------------------------------------


def ingress(r: redis.Redis, keys: Keys, prefix: str) -> list[Any]:
    """The ingress entries, parsed as a balancer would."""
    return [parse_request(fields, entry_id=eid.decode(), prefix=prefix, max_request_bytes=1 << 20,
                          signing_key=r.get(keys.signing_key))
            for eid, fields in r.xrange(keys.requests)]


def test_drain_finishes_held_requests_and_hands_back_queued_ones(
        r: redis.Redis, keys: Keys, prefix: str, make_group: MakeGroup) -> None:
    group = make_group("g1", worker_max_batch=2)
    t0 = int(r.time()[0]) * 1000
    held = [make_request(keys, f"h{n}", f"held request {n}", enqueued_ms=t0) for n in range(2)]
    queued = make_request(keys, "q", "still queued", enqueued_ms=t0, timeout_s=99.0, stop=["zz"])
    for request in [*held, queued]:
        enqueue(r, keys, "g1", request)
    group.tick()
    assert set(group.held) == {"h0", "h1", "q"}
    assert {rid for rid, h in group.held.items() if h.running} == {"h0", "h1"}  # worker_max_batch

    seen: list[tuple[bool, str]] = []
    real_tick = group.tick

    def observed_tick() -> None:
        info = r.hgetall(keys.group_info("g1"))
        seen.append((bool(r.exists(keys.group_accepting("g1"))), info[b"state"].decode()))
        real_tick()

    group.tick = observed_tick  # type: ignore[method-assign]
    group.drain()
    group.run()

    assert seen and set(seen) == {(False, "draining")}  # closed before finishing what it held
    for request in held:
        assert_one_clean_completion(events(r, request.reply_to), text=request.prompt)
    assert events(r, queued.reply_to) == []
    (back,) = ingress(r, keys, prefix)
    assert (back.id, back.takeover_from, back.takeover_epoch) == ("q", "g1", 1)
    assert (back.prompt, back.enqueued_ms, back.timeout_s) == ("still queued", t0, 99.0)
    assert back.sampling.stop == ("zz",)
    assert r.zscore(keys.groups, "g1") is None and not r.exists(keys.group_info("g1"))
    assert not r.exists(keys.group_accepting("g1"))
    assert r.xlen(keys.group_queue("g1")) == 0 and pending(r, keys, "g1") == 0


def test_second_drain_hands_everything_back_at_once(
        r: redis.Redis, keys: Keys, prefix: str, make_group: MakeGroup) -> None:
    group = make_group("g1", worker_max_batch=1)
    first, second = make_request(keys, "a", "a long prompt"), make_request(keys, "b", "another one")
    enqueue(r, keys, "g1", first)
    enqueue(r, keys, "g1", second)
    group.tick()
    group.tick()
    published = events(r, first.reply_to)
    assert len(published) == 2
    def no_tick() -> None:
        raise AssertionError("a second drain() must hand back without another tick")

    group.tick = no_tick  # type: ignore[method-assign]
    group.drain()
    group.drain()
    group.run()
    assert events(r, first.reply_to) == published  # no final: the next owner finishes it
    assert {(q.id, q.takeover_from, q.takeover_epoch) for q in ingress(r, keys, prefix)} == {
        ("a", "g1", 1), ("b", "g1", 1)}
    assert not group.engine.has_work()
    assert r.zscore(keys.groups, "g1") is None and not r.exists(keys.group_accepting("g1"))
    assert r.xlen(keys.group_queue("g1")) == 0 and pending(r, keys, "g1") == 0


def test_drain_timeout_hands_back_what_is_still_held(
        r: redis.Redis, keys: Keys, prefix: str, make_group: MakeGroup, mono: FakeMonotonic) -> None:
    group = make_group("g1", drain_timeout_s=5.0)
    request = make_request(keys, "long", "x" * 100)
    enqueue(r, keys, "g1", request)
    group.tick()
    real_tick, ticks = group.tick, []

    def slow_tick() -> None:
        ticks.append(1)
        mono.advance(2.0)
        real_tick()

    group.tick = slow_tick  # type: ignore[method-assign]
    group.drain()
    group.run()
    assert len(ticks) == 3  # 0 s, 2 s, 4 s: then 6 s is past the 5 s drain timeout
    assert len(tokens(events(r, request.reply_to))) == 4 and not finals(events(r, request.reply_to))
    assert [(q.id, q.takeover_from) for q in ingress(r, keys, prefix)] == [("long", "g1")]
    assert r.zscore(keys.groups, "g1") is None


def test_drain_of_an_idle_group_deregisters_at_once(
        r: redis.Redis, keys: Keys, make_group: MakeGroup) -> None:
    group = make_group("g1")
    group.drain()
    group.run()
    assert r.zscore(keys.groups, "g1") is None and not r.exists(keys.group_accepting("g1"))
    assert r.xlen(keys.requests) == 0


# --- migration: continuing a request from the tokens another group published ------------------------


def publish_as(r: redis.Redis, keys: Keys, request: Any, group: str, epoch: int, token_ids: list[int]) -> None:
    """What a previous owner streamed before it died: token events 0..k-1 with the deltas it sent."""
    from broker.scripts import Scripts, pack_events
    from gpu_workers.output import OutputState
    from gpu_workers.tokenizer import ByteTokenizer

    out = OutputState(sampling=request.sampling, prompt_ids=list((request.prompt or "").encode()),
                      tokenizer=ByteTokenizer(), eos_token_ids=frozenset(), max_context=1 << 20)
    events = []
    for token_id in token_ids:
        res = out.push(token_id)
        events.append(("t", res.index, token_event(request.id, res.index, res.token_id, res.text)))
    raw = Scripts(r).publish(reply_stream=request.reply_to, progress=keys.progress(request.reply_to, request.id),
                             publisher=group, epoch=epoch, ttl_ms=60_000, events=pack_events(events))
    assert raw[0] == b"ok"


@pytest.mark.parametrize("cut", [1, 2, 3, 9, 14])
def test_moved_request_continues_after_the_published_tokens(
        r: redis.Redis, keys: Keys, make_group: MakeGroup, cut: int) -> None:
    prompt = "héllo wörld STOP and more"  # multi-byte characters and a stop string around the cuts
    request = make_request(keys, "moved", prompt, stop=["STOP"])
    r.set(keys.group_accepting("dead"), "1")
    epoch = enqueue(r, keys, "dead", request)  # pinned to a group that is about to die
    raw = list(prompt.encode())
    publish_as(r, keys, request, "dead", epoch, raw[:cut])
    _owner, new_epoch = take_over(r, keys, request, to="g1", frm="dead", epoch=epoch)
    claim = claim_result(Scripts(r).claim_owner(progress=keys.progress(request.reply_to, request.id),
                                                group="g1", ttl_ms=60_000))
    assert claim.output_ids == tuple(raw[:cut])
    group = make_group("g1")
    moved = request.model_copy(update={"output_ids": claim.output_ids})
    dispatch(r, keys, "g1", moved, new_epoch)
    run_until(group.tick, finished(r, request.reply_to))
    final = assert_one_clean_completion(events(r, request.reply_to), text="héllo wörld ")
    assert json.loads(final["token_ids"]) == list("héllo wörld STOP".encode())
    assert final["finish_reason"] == "stop"
    assert not r.exists(*keys.progress(request.reply_to, request.id)[1:])  # the record went with the final


def test_moved_request_whose_published_tokens_already_end_it(
        r: redis.Redis, keys: Keys, make_group: MakeGroup) -> None:
    group = make_group("g1")
    request = make_request(keys, "ended", "abcdef", max_tokens=3)
    r.set(keys.group_accepting("dead"), "1")
    epoch = enqueue(r, keys, "dead", request)
    take_over(r, keys, request, to="g1", frm="dead", epoch=epoch)
    dispatch(r, keys, "g1", request.model_copy(update={"output_ids": (97, 98, 99)}), epoch + 1)
    added: list[str] = []
    group.engine.add = lambda req: added.append(req.request_id)  # type: ignore[method-assign]
    run_until(group.tick, finished(r, request.reply_to))
    (final,) = finals(events(r, request.reply_to))
    assert (final["finish_reason"], final["text"]) == ("length", "abc") and added == []


def test_a_publish_gap_ends_the_request_with_an_internal_error(
        r: redis.Redis, keys: Keys, make_group: MakeGroup) -> None:
    group = make_group("g1")
    request = make_request(keys, "gap", "abcdef")
    # Claims to continue after 2 tokens the stream never carried: its first token would be index 2.
    epoch = enqueue(r, keys, "g1", request.model_copy(update={"output_ids": (97, 98)}))
    assert epoch == 1
    run_until(group.tick, finished(r, request.reply_to))
    run_until(group.tick, lambda: not group.held)
    (final,) = events(r, request.reply_to)
    assert (final["event"], final["code"]) == ("error", "internal")
    assert r.xlen(keys.group_queue("g1")) == 0 and not group.engine.has_work()


# --- queued requests: priority, cancel and deadline before they run ------------------------------------


def test_priority_decides_which_queued_request_runs_first(
        r: redis.Redis, keys: Keys, make_group: MakeGroup) -> None:
    group = make_group("g1", worker_max_batch=1)
    for rid, priority in (("late", 5), ("first", -1), ("second", 0), ("third", 0)):
        enqueue(r, keys, "g1", make_request(keys, rid, "ab", priority=priority))
    order: list[str] = []
    real_add = group.engine.add
    group.engine.add = lambda req: (order.append(req.request_id), real_add(req))[1]  # type: ignore[method-assign]
    run_until(group.tick, finished(r, *(keys.result(x) for x in ("late", "first", "second", "third"))))
    assert order == ["first", "second", "third", "late"]


def test_the_engine_gets_each_request_s_deadline_in_seconds_on_the_redis_clock(
        r: redis.Redis, keys: Keys, make_group: MakeGroup) -> None:
    group = make_group("g1")
    t0 = 1_700_000_000_000
    group.clock = FakeClock(t0)  # type: ignore[assignment]
    for rid, timeout_s in (("none", None), ("tight", 2.0)):
        enqueue(r, keys, "g1", make_request(keys, rid, "ab", enqueued_ms=t0, timeout_s=timeout_s))
    added: dict[str, float | None] = {}
    real_add = group.engine.add
    group.engine.add = lambda req: (added.update({req.request_id: req.deadline}), real_add(req))[1]  # type: ignore[method-assign]
    group.tick()
    assert added == {"none": None, "tight": (t0 + 2000) / 1000}


def test_cancel_and_deadline_end_queued_requests_at_once(
        r: redis.Redis, keys: Keys, make_group: MakeGroup) -> None:
    group = make_group("g1", worker_max_batch=1)
    t0 = 1_700_000_000_000
    group.clock = FakeClock(t0)  # type: ignore[assignment]
    enqueue(r, keys, "g1", make_request(keys, "busy", "x" * 50, enqueued_ms=t0))
    enqueue(r, keys, "g1", make_request(keys, "cancel-me", "never runs", enqueued_ms=t0))
    enqueue(r, keys, "g1", make_request(keys, "expire-me", "never runs", enqueued_ms=t0, timeout_s=1.0))
    group.tick()
    assert {rid for rid, h in group.held.items() if h.running} == {"busy"}
    r.xadd(keys.cancel, {"id": "cancel-me"})
    group.clock.ms = t0 + 1000
    group.tick()
    (cancelled,) = events(r, keys.result("cancel-me"))
    assert (cancelled["finish_reason"], cancelled["token_ids"]) == ("cancelled", "[]")
    (expired,) = events(r, keys.result("expire-me"))
    assert expired["code"] == "timeout"
    assert len(tokens(events(r, keys.result("busy")))) == 2  # it went on, one token per step


# --- a request that breaks the engine -----------------------------------------------------------------


class PoisonEngine(EchoEngine):
    """Echo, except that a step fails while a prompt byte '!' is the next token, add() fails for '#',
    and add() refuses '%' as a request it can never run."""

    def add(self, request: Any) -> None:
        if 35 in request.prompt_ids:
            raise RuntimeError("cannot add")
        if 37 in request.prompt_ids:
            raise EngineRequestError(f"request {request.request_id} may need 9999 tokens of KV cache")
        super().add(request)

    def step(self) -> list[Any]:
        if any(prompt[pos] == 33 for prompt, pos in self._running.values()):
            raise RuntimeError("kernel crashed")
        return super().step()


def test_a_request_that_breaks_the_engine_ends_alone_with_internal(
        r: redis.Redis, keys: Keys, make_group: MakeGroup) -> None:
    group = make_group("g1", engine=PoisonEngine())
    prompts = {"ok1": "fine request", "bad": "goes wrong! here", "ok2": "also fine, longer one",
               "refused": "has a # in it", "ok3": "z"}
    for rid, prompt in prompts.items():
        enqueue(r, keys, "g1", make_request(keys, rid, prompt))
    run_until(group.tick, finished(r, *(keys.result(x) for x in prompts)), limit=400)
    for rid in ("ok1", "ok2", "ok3"):
        assert_one_clean_completion(events(r, keys.result(rid)), text=prompts[rid])
    for rid in ("bad", "refused"):
        evs = events(r, keys.result(rid))
        final = assert_one_clean_completion(evs)
        assert (final["event"], final["code"]) == ("error", "internal")
    assert len(tokens(events(r, keys.result("bad")))) == len("goes wrong")  # streamed up to the bad token
    assert not group.isolation.active and not group.engine.has_work()
    # the group goes on serving
    enqueue(r, keys, "g1", make_request(keys, "after", "still here"))
    run_until(group.tick, finished(r, keys.result("after")))
    assert_one_clean_completion(events(r, keys.result("after")), text="still here")


def test_a_request_the_engine_can_never_run_ends_alone_with_invalid_request(
        r: redis.Redis, keys: Keys, make_group: MakeGroup) -> None:
    group = make_group("g1", engine=PoisonEngine())
    prompts = {"ok1": "fine request", "huge": "needs 100% of it", "ok2": "z"}
    for rid, prompt in prompts.items():
        enqueue(r, keys, "g1", make_request(keys, rid, prompt))
    run_until(group.tick, finished(r, *(keys.result(x) for x in prompts)), limit=400)
    for rid in ("ok1", "ok2"):
        assert_one_clean_completion(events(r, keys.result(rid)), text=prompts[rid])
    final = assert_one_clean_completion(events(r, keys.result("huge")))
    assert (final["event"], final["code"]) == ("error", "invalid_request")
    assert "9999 tokens of KV cache" in final["message"]
    assert not group.engine.has_work()


# --- failed over while alive, stopping now --------------------------------------------------------------


def test_a_group_failed_over_while_stalled_drops_what_moved_and_registers_again(
        r: redis.Redis, keys: Keys, make_group: MakeGroup) -> None:
    group = make_group("g1")
    request = make_request(keys, "moving", "a long enough prompt")
    epoch = enqueue(r, keys, "g1", request)
    for _ in range(3):
        group.tick()
    group._read_inputs()
    group._step_engine()  # it stalls here, with a token to publish, and a balancer declares it dead:
    before = events(r, request.reply_to)
    take_over(r, keys, request, to="g2", frm="g1", epoch=epoch)
    r.delete(keys.group_accepting("g1"), keys.group_queue("g1"))
    group._publish()  # it wakes up
    assert events(r, request.reply_to) == before and group.fenced == 1
    ticks = []
    real_tick = group.tick

    def tick() -> None:
        ticks.append(1)
        if len(ticks) == 3:
            group.state = GroupState.STOPPING
        real_tick()

    group.tick = tick  # type: ignore[method-assign]
    assert group.run() == 0  # finds its queue gone, registers again
    assert events(r, request.reply_to) == before
    assert group.held == {}
    assert r.get(keys.group_accepting("g1")) == b"1"
    assert [g["name"] for g in r.xinfo_groups(keys.group_queue("g1"))] == [QUEUE_GROUP.encode()]
    assert r.zscore(keys.groups, "g1") is not None  # stop_now: still registered, left to failover
    enqueue(r, keys, "g1", make_request(keys, "new", "served after rejoining"))
    group.tick = real_tick  # type: ignore[method-assign]
    group.state = GroupState.READY  # (stopped by hand above, not by signals: it serves on)
    run_until(group.tick, finished(r, keys.result("new")))
    assert_one_clean_completion(events(r, keys.result("new")), text="served after rejoining")


def test_third_signal_stops_at_once_leaving_work_for_failover(
        r: redis.Redis, keys: Keys, make_group: MakeGroup) -> None:
    group = make_group("g1")
    enqueue(r, keys, "g1", make_request(keys, "held", "x" * 50))
    group.tick()
    group.drain()
    group.drain()
    group.drain()
    assert group.state is GroupState.STOPPING
    assert group.run() == 0
    assert pending(r, keys, "g1") == 1 and r.zscore(keys.groups, "g1") is not None
    assert r.xlen(keys.requests) == 0  # nothing handed back: the balancers fail it over


def test_recover_after_a_reconnect_readmits_entries_it_no_longer_holds(
        r: redis.Redis, keys: Keys, make_group: MakeGroup) -> None:
    group = make_group("g1")
    request = make_request(keys, "lost", "abc")
    enqueue(r, keys, "g1", request)
    group.tick()
    group.holding.clear()  # as after Redis came back from an older AOF: the group forgot it
    group.engine.close()
    group._recover()
    assert set(group.held) == {"lost"}
    run_until(group.tick, finished(r, request.reply_to))
    assert_one_clean_completion(events(r, request.reply_to), text="abc")


# --- heartbeat load -----------------------------------------------------------------------------------


def test_heartbeat_reports_tokens_latency_and_rate(
        r: redis.Redis, keys: Keys, make_group: MakeGroup, mono: FakeMonotonic) -> None:
    engine = EchoEngine()
    real_step = engine.step

    def slow_step() -> Any:
        mono.advance(0.05)  # each step takes 50 ms
        return real_step()

    engine.step = slow_step  # type: ignore[method-assign]
    group = make_group("g1", engine=engine, worker_max_batch=1, heartbeat_interval_s=1.0)
    enqueue(r, keys, "g1", make_request(keys, "a", "x" * 30, max_tokens=40), cost=70)
    enqueue(r, keys, "g1", make_request(keys, "b", "y" * 30, max_tokens=40), cost=70)
    for _ in range(10):
        group.tick()
    mono.advance(0.5)
    group.tick()  # 11 steps in 1.05 s since the registration heartbeat
    (status,) = read_groups(r, keys, dead_after_s=3.0)
    assert (status.running, status.queue_depth) == (1, 1)
    assert status.queued_tokens == 70 and status.running_tokens == 30 + 11
    assert status.latency_ewma_ms == pytest.approx(50.0)
    assert status.tokens_per_s == pytest.approx(11 / 1.05, rel=0.01)
