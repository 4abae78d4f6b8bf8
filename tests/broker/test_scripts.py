"""The Lua scripts on a real Redis: ownership, idempotent dispatch, fenced in-order publishing, heartbeats."""

from __future__ import annotations

import pytest
import redis

from broker.events import done_event, error_event, token_event
from broker.keys import QUEUE_GROUP, Keys, Progress
from broker.scripts import Claim, PublishResult, Scripts, claim_result, pack_events, publish_result

TTL_MS = 60_000
RID = "req-1"


@pytest.fixture
def scripts(r: redis.Redis) -> Scripts:
    return Scripts(r)


@pytest.fixture
def reply(keys: Keys) -> str:
    return keys.result(RID)


@pytest.fixture
def state(keys: Keys, reply: str) -> str:
    return keys.state(reply, RID)


def progress(state: str) -> Progress:
    """The keys CLAIM_OWNER and PUBLISH read next to the state (its companions: same request)."""
    prefix = state.rsplit(":state:", 1)[0]
    return Progress(state, f"{prefix}:gen:{RID}", f"{prefix}:gentext:{RID}")


def claim(
    scripts: Scripts,
    state: str,
    group: str,
    *,
    takeover: tuple[str, int] | None = None,
    client: redis.client.Pipeline | None = None,
) -> tuple[str, int, int]:
    taken_from, taken_from_epoch = takeover if takeover is not None else (None, 0)
    owner, epoch, finished, *_ = scripts.claim_owner(progress=progress(state), group=group, ttl_ms=TTL_MS,
                                                     taken_from=taken_from, taken_from_epoch=taken_from_epoch,
                                                     client=client)
    return owner.decode(), int(epoch), int(finished)


def tok(index: int) -> tuple[str, int, dict[str, str]]:
    return ("t", index, token_event(RID, index, 100 + index, f" w{index}"))


def done() -> tuple[str, int, dict[str, str]]:
    return ("f", 0, done_event(RID, text="all", token_ids=[1, 2], finish_reason="stop", prompt_tokens=3))


def publish(
    scripts: Scripts,
    reply: str,
    state: str,
    publisher: str,
    epoch: int,
    events: list[tuple[str, int, dict[str, str]]],
) -> PublishResult:
    raw = scripts.publish(reply_stream=reply, progress=progress(state), publisher=publisher, epoch=epoch,
                          ttl_ms=TTL_MS, events=pack_events(events))
    return publish_result(raw)


def written(r: redis.Redis, reply: str) -> list[dict[str, str]]:
    return [{k.decode(): v.decode() for k, v in fields.items()} for _, fields in r.xrange(reply)]


def token_indices(r: redis.Redis, reply: str) -> list[int]:
    return [int(ev["index"]) for ev in written(r, reply) if ev["event"] == "token"]


# --- CLAIM_OWNER / RELEASE ------------------------------------------------------------------------------


def test_first_claim_pins_the_owner_and_later_callers_learn_it(
    r: redis.Redis, scripts: Scripts, state: str
) -> None:
    assert claim(scripts, state, "g1") == ("g1", 1, 0)
    assert claim(scripts, state, "g2") == ("g1", 1, 0)
    assert claim(scripts, state, "g1") == ("g1", 1, 0)
    assert r.hget(state, "owner") == b"g1"
    assert 0 < r.pttl(state) <= TTL_MS


def test_takeover_from_the_current_owner_and_epoch(scripts: Scripts, state: str) -> None:
    claim(scripts, state, "g1")
    assert claim(scripts, state, "g2", takeover=("g1", 1)) == ("g2", 2, 0)
    # A second, stale takeover (another balancer saw the same hand-back) does not move it again.
    assert claim(scripts, state, "g3", takeover=("g1", 1)) == ("g2", 2, 0)
    assert claim(scripts, state, "g3", takeover=("g2", 1)) == ("g2", 2, 0)
    assert claim(scripts, state, "g3", takeover=("", 2)) == ("g2", 2, 0)
    assert claim(scripts, state, "g3", takeover=("g2", 2)) == ("g3", 3, 0)


def test_finished_request_reports_finished_and_is_not_reassigned(
    r: redis.Redis, scripts: Scripts, reply: str, state: str
) -> None:
    claim(scripts, state, "g1")
    assert publish(scripts, reply, state, "g1", 1, [done()]).status == "ok"
    assert claim(scripts, state, "g2") == ("g1", 1, 1)
    assert claim(scripts, state, "g2", takeover=("g1", 1)) == ("g1", 1, 1)
    assert r.hget(state, "owner") == b"g1"


def test_finished_before_any_claim(scripts: Scripts, reply: str, state: str) -> None:
    # A balancer rejects a request it never routed: the error is the final event, nobody may claim it.
    assert (
        publish(scripts, reply, state, "balancer", 0, [("f", 0, error_event(RID, "timeout", "late"))]).status
        == "ok"
    )
    assert claim(scripts, state, "g1") == ("", 0, 1)


# --- DISPATCH -------------------------------------------------------------------------------------------


def dispatch(scripts: Scripts, keys: Keys, group: str, epoch: int, payload: bytes = b"req", *, rid: str = RID,
             cost: int = 0, max_requests: int = 0, max_tokens: int = 0) -> list[bytes]:
    return scripts.dispatch(
        queue=keys.group_queue(group), marker=keys.dispatch_marker(group, rid, epoch),
        accepting=keys.group_accepting(group), queue_tokens=keys.group_queue_tokens(group),
        request=payload, epoch=epoch, marker_ttl_ms=TTL_MS, cost=cost, max_entries=max_requests,
        max_tokens=max_tokens,
    )


def test_dispatch_is_idempotent_per_request_and_epoch(r: redis.Redis, scripts: Scripts, keys: Keys) -> None:
    r.set(keys.group_accepting("g1"), 1)
    status, entry_id = dispatch(scripts, keys, "g1", 1, b"\x81\xa1a\x01")
    assert status == b"ok"
    assert dispatch(scripts, keys, "g1", 1) == [b"dup"]
    assert dispatch(scripts, keys, "g1", 1) == [b"dup"]
    entries = r.xrange(keys.group_queue("g1"))
    assert entries == [(entry_id, {b"r": b"\x81\xa1a\x01", b"e": b"1", b"c": b"0"})]
    assert 0 < r.pttl(keys.dispatch_marker("g1", RID, 1)) <= TTL_MS

    # A new epoch (the request was re-routed) is a new dispatch.
    status, _ = dispatch(scripts, keys, "g1", 2)
    assert status == b"ok"
    assert r.xlen(keys.group_queue("g1")) == 2


def test_dispatch_to_a_group_that_does_not_accept(r: redis.Redis, scripts: Scripts, keys: Keys) -> None:
    assert dispatch(scripts, keys, "g1", 1) == [b"closed"]
    assert not r.exists(keys.group_queue("g1"))
    assert not r.exists(keys.dispatch_marker("g1", RID, 1))
    # Once the group accepts, the same (request, epoch) still goes through: 'closed' left no marker.
    r.set(keys.group_accepting("g1"), 1)
    assert dispatch(scripts, keys, "g1", 1)[0] == b"ok"


def test_claim_and_dispatch_in_one_pipeline(r: redis.Redis, scripts: Scripts, keys: Keys, state: str) -> None:
    r.set(keys.group_accepting("g1"), 1)
    pipe = r.pipeline(transaction=False)
    scripts.claim_owner(progress=progress(state), group="g1", ttl_ms=TTL_MS, client=pipe)
    scripts.dispatch(
        queue=keys.group_queue("g1"), marker=keys.dispatch_marker("g1", RID, 1), accepting=keys.group_accepting("g1"),
        queue_tokens=keys.group_queue_tokens("g1"), request=b"x", epoch=1, marker_ttl_ms=TTL_MS, cost=5,
        client=pipe,
    )
    (owner, epoch, finished, _ids, _text), (status, _) = pipe.execute()
    assert (owner, epoch, finished, status) == (b"g1", 1, 0, b"ok")
    assert r.xlen(keys.group_queue("g1")) == 1


# --- PUBLISH --------------------------------------------------------------------------------------------


def test_token_events_are_written_in_order(r: redis.Redis, scripts: Scripts, reply: str, state: str) -> None:
    claim(scripts, state, "g1")
    assert publish(scripts, reply, state, "g1", 1, [tok(0), tok(1), tok(2)]) == PublishResult("ok", 3)
    assert publish(scripts, reply, state, "g1", 1, [tok(3)]) == PublishResult("ok", 4)
    events = written(r, reply)
    assert [ev["index"] for ev in events] == ["0", "1", "2", "3"]
    assert events[1] == {"id": RID, "event": "token", "index": "1", "token_id": "101", "text": " w1"}


def test_duplicate_token_indices_are_skipped(
    r: redis.Redis, scripts: Scripts, reply: str, state: str
) -> None:
    claim(scripts, state, "g1")
    publish(scripts, reply, state, "g1", 1, [tok(0), tok(1)])
    # A retried batch, or a new owner replaying from the start: only the new tail is written.
    assert publish(scripts, reply, state, "g1", 1, [tok(0), tok(1), tok(2)]) == PublishResult("ok", 3)
    assert publish(scripts, reply, state, "g1", 1, [tok(1), tok(1)]) == PublishResult("ok", 3)
    assert token_indices(r, reply) == [0, 1, 2]


def test_a_gap_stops_writing(r: redis.Redis, scripts: Scripts, reply: str, state: str) -> None:
    claim(scripts, state, "g1")
    publish(scripts, reply, state, "g1", 1, [tok(0)])
    assert publish(scripts, reply, state, "g1", 1, [tok(2), tok(3)]) == PublishResult("gap", 1)
    assert token_indices(r, reply) == [0]
    # Writes up to the gap, then stops; a final after the gap is not written either.
    assert publish(scripts, reply, state, "g1", 1, [tok(1), tok(3), done()]) == PublishResult("gap", 2)
    assert token_indices(r, reply) == [0, 1]
    assert r.hget(state, "final") is None


def test_final_is_written_once(r: redis.Redis, scripts: Scripts, reply: str, state: str) -> None:
    claim(scripts, state, "g1")
    assert publish(scripts, reply, state, "g1", 1, [tok(0), tok(1), done()]) == PublishResult("ok", 2)
    assert publish(scripts, reply, state, "g1", 1, [done()]).status == "final"
    assert publish(scripts, reply, state, "g1", 1, [tok(2)]).status == "final"
    events = written(r, reply)
    assert [ev["event"] for ev in events] == ["token", "token", "done"]
    assert events[-1]["finish_reason"] == "stop"


def test_events_after_a_final_in_the_same_batch_are_dropped(
    r: redis.Redis, scripts: Scripts, reply: str, state: str
) -> None:
    claim(scripts, state, "g1")
    err = ("f", 0, error_event(RID, "internal", "boom"))
    assert publish(scripts, reply, state, "g1", 1, [tok(0), err, done(), tok(1)]) == PublishResult("ok", 1)
    assert [ev["event"] for ev in written(r, reply)] == ["token", "error"]


@pytest.mark.parametrize(("publisher", "epoch"), [("g2", 1), ("g1", 2), ("g1", 0), ("balancer", 1)])
def test_publish_is_fenced_by_owner_and_epoch(
    r: redis.Redis, scripts: Scripts, reply: str, state: str, publisher: str, epoch: int
) -> None:
    claim(scripts, state, "g1")
    publish(scripts, reply, state, "g1", 1, [tok(0)])
    before = r.hgetall(state)
    assert publish(scripts, reply, state, publisher, epoch, [tok(1), done()]).status == "fenced"
    assert token_indices(r, reply) == [0]
    assert r.hgetall(state) == before


def test_previous_owner_is_fenced_after_a_takeover(
    r: redis.Redis, scripts: Scripts, reply: str, state: str
) -> None:
    claim(scripts, state, "g1")
    publish(scripts, reply, state, "g1", 1, [tok(0), tok(1)])
    assert claim(scripts, state, "g2", takeover=("g1", 1)) == ("g2", 2, 0)
    assert publish(scripts, reply, state, "g1", 1, [tok(2), done()]).status == "fenced"
    # The new owner regenerates from the start; the client still sees each index exactly once.
    assert publish(scripts, reply, state, "g2", 2, [tok(0), tok(1), tok(2), done()]) == PublishResult("ok", 3)
    assert token_indices(r, reply) == [0, 1, 2]
    assert [ev["event"] for ev in written(r, reply)].count("done") == 1


def test_publish_sets_ttls(r: redis.Redis, scripts: Scripts, reply: str, state: str) -> None:
    claim(scripts, state, "g1")
    publish(scripts, reply, state, "g1", 1, [tok(0)])
    assert 0 < r.pttl(reply) <= TTL_MS
    assert 0 < r.pttl(state) <= TTL_MS
    r.persist(reply)
    publish(scripts, reply, state, "g1", 1, [done()])
    assert 0 < r.pttl(reply) <= TTL_MS


def test_requests_sharing_a_reply_stream_finish_independently(
    r: redis.Redis, scripts: Scripts, keys: Keys
) -> None:
    reply = keys.client_replies("c1")
    state_a, state_b = keys.state(reply, "a"), keys.state(reply, "b")
    claim(scripts, state_a, "g1")
    claim(scripts, state_b, "g2")
    assert publish(scripts, reply, state_a, "g1", 1, [tok(0), done()]) == PublishResult("ok", 1)
    # b's first token and its final are not mistaken for duplicates of a's.
    assert publish(scripts, reply, state_b, "g2", 1, [tok(0), tok(1), done()]) == PublishResult("ok", 2)
    assert publish(scripts, reply, state_b, "g1", 1, [done()]).status == "fenced"
    assert [ev["event"] for ev in written(r, reply)] == ["token", "done", "token", "token", "done"]


def test_publish_result_accepts_str_and_bytes() -> None:
    assert publish_result([b"gap", 4]) == PublishResult("gap", 4)
    assert publish_result(["ok", "7"]) == PublishResult("ok", 7)


# --- progress: what a new owner continues from -----------------------------------------------------


def test_published_tokens_are_recorded_once_and_returned_by_a_takeover(
    r: redis.Redis, scripts: Scripts, reply: str, state: str
) -> None:
    claim(scripts, state, "g1")
    publish(scripts, reply, state, "g1", 1, [tok(0), tok(1)])
    publish(scripts, reply, state, "g1", 1, [tok(1), tok(2)])  # a retry: index 1 is not recorded again
    raw = scripts.claim_owner(progress=progress(state), group="g2", ttl_ms=TTL_MS, taken_from="g1", taken_from_epoch=1)
    assert claim_result(raw) == Claim("g2", 2, False, (100, 101, 102), " w0 w1 w2")
    # the fenced old owner adds nothing; the new owner's tokens continue the record
    publish(scripts, reply, state, "g1", 1, [tok(3)])
    publish(scripts, reply, state, "g2", 2, [tok(3)])
    raw = scripts.claim_owner(progress=progress(state), group="g3", ttl_ms=TTL_MS)
    assert claim_result(raw) == Claim("g2", 2, False, (100, 101, 102, 103), " w0 w1 w2 w3")
    for key in progress(state)[1:]:
        assert 0 < r.pttl(key) <= TTL_MS


def test_the_record_goes_with_the_final_event(r: redis.Redis, scripts: Scripts, reply: str, state: str) -> None:
    claim(scripts, state, "g1")
    publish(scripts, reply, state, "g1", 1, [tok(0), ("t", 1, token_event(RID, 1, 7, ""))])
    assert r.get(progress(state)[1]) == b"100,7,"
    assert r.get(progress(state)[2]) == b" w0"  # an empty delta (held back text) adds nothing
    publish(scripts, reply, state, "g1", 1, [done()])
    assert not r.exists(*progress(state)[1:])
    assert claim_result(scripts.claim_owner(progress=progress(state), group="g2", ttl_ms=TTL_MS, taken_from="g1",
                                            taken_from_epoch=1)) == Claim("g1", 1, True)


def test_a_first_claim_has_no_progress(scripts: Scripts, state: str) -> None:
    assert claim_result(scripts.claim_owner(progress=progress(state), group="g1", ttl_ms=TTL_MS)) == Claim(
        "g1", 1, False)


# --- admission bounds in DISPATCH, ACK, RETIRE_QUEUE ---------------------------------------------------


def test_dispatch_refuses_past_the_request_bound(r: redis.Redis, scripts: Scripts, keys: Keys) -> None:
    r.set(keys.group_accepting("g1"), 1)
    for n in range(3):
        assert dispatch(scripts, keys, "g1", 1, rid=f"q{n}", cost=10, max_requests=3)[0] == b"ok"
    assert dispatch(scripts, keys, "g1", 1, rid="q3", cost=10, max_requests=3) == [b"full"]
    assert not r.exists(keys.dispatch_marker("g1", "q3", 1))  # 'full' leaves no marker: it may come again
    assert dispatch(scripts, keys, "g1", 1, rid="q0", cost=10, max_requests=3) == [b"dup"]  # a replay is no new work
    assert dispatch(scripts, keys, "g1", 1, rid="q3", cost=10, max_requests=0)[0] == b"ok"  # unbounded (moved)
    assert r.xlen(keys.group_queue("g1")) == 4 and int(r.get(keys.group_queue_tokens("g1"))) == 40


def test_dispatch_refuses_past_the_token_bound_but_an_empty_queue_takes_anything(
    r: redis.Redis, scripts: Scripts, keys: Keys
) -> None:
    r.set(keys.group_accepting("g1"), 1)
    assert dispatch(scripts, keys, "g1", 1, rid="huge", cost=500, max_tokens=100)[0] == b"ok"
    assert dispatch(scripts, keys, "g1", 1, rid="small", cost=1, max_tokens=100) == [b"full"]
    r.delete(keys.group_queue("g1"), keys.group_queue_tokens("g1"))
    assert dispatch(scripts, keys, "g1", 1, rid="a", cost=60, max_tokens=100)[0] == b"ok"
    assert dispatch(scripts, keys, "g1", 1, rid="b", cost=40, max_tokens=100)[0] == b"ok"
    assert dispatch(scripts, keys, "g1", 1, rid="c", cost=1, max_tokens=100) == [b"full"]


def test_ack_takes_the_cost_off_once(r: redis.Redis, scripts: Scripts, keys: Keys) -> None:
    r.set(keys.group_accepting("g1"), 1)
    queue, counter = keys.group_queue("g1"), keys.group_queue_tokens("g1")
    r.xgroup_create(queue, QUEUE_GROUP, id="0", mkstream=True)
    ids = [dispatch(scripts, keys, "g1", 1, rid=f"a{n}", cost=10 + n)[1] for n in range(3)]
    r.xreadgroup(QUEUE_GROUP, "leader", {queue: ">"})
    assert scripts.ack(queue=queue, queue_tokens=counter, consumer_group=QUEUE_GROUP, entry_ids=ids[:2]) == 21
    assert scripts.ack(queue=queue, queue_tokens=counter, consumer_group=QUEUE_GROUP,
                       entry_ids=ids[:2]) == 0  # a retried ack
    assert int(r.get(counter)) == 12 and r.xlen(queue) == 1
    assert r.xpending(queue, QUEUE_GROUP)["pending"] == 1
    assert scripts.ack(queue=queue, queue_tokens=counter, consumer_group=QUEUE_GROUP, entry_ids=[ids[2]]) == 12
    assert not r.exists(counter) and r.xpending(queue, QUEUE_GROUP)["pending"] == 0


def test_retire_queue_deletes_only_an_empty_queue(r: redis.Redis, scripts: Scripts, keys: Keys) -> None:
    r.set(keys.group_accepting("g1"), 1)
    queue, counter = keys.group_queue("g1"), keys.group_queue_tokens("g1")
    (_ok, entry) = dispatch(scripts, keys, "g1", 1, cost=3)
    assert scripts.retire_queue(queue=queue, queue_tokens=counter) == 0  # the group came back: it keeps it
    r.xdel(queue, entry)
    assert scripts.retire_queue(queue=queue, queue_tokens=counter) == 1
    assert not r.exists(queue) and not r.exists(counter)


# --- HEARTBEAT ------------------------------------------------------------------------------------------


def _redis_ms(r: redis.Redis) -> int:
    secs, micros = r.time()
    return secs * 1000 + micros // 1000


def test_heartbeat_stamps_with_the_server_clock(r: redis.Redis, scripts: Scripts, keys: Keys) -> None:
    before = _redis_ms(r)
    ms = int(
        scripts.heartbeat(registry=keys.groups, info=keys.group_info("g1"), group="g1",
                          fields=["running", 3, "host", "h1"])
    )
    after = _redis_ms(r)
    assert before <= ms <= after
    info = r.hgetall(keys.group_info("g1"))
    assert info == {b"heartbeat_ms": str(ms).encode(), b"running": b"3", b"host": b"h1"}
    assert r.zscore(keys.groups, "g1") == ms


def test_heartbeat_updates_the_registry(r: redis.Redis, scripts: Scripts, keys: Keys) -> None:
    first = int(scripts.heartbeat(registry=keys.groups, info=keys.group_info("g1"), group="g1", fields=["running", 3]))
    scripts.heartbeat(registry=keys.groups, info=keys.group_info("g2"), group="g2", fields=["running", 0])
    second = int(scripts.heartbeat(registry=keys.groups, info=keys.group_info("g1"), group="g1", fields=["running", 5]))
    assert second >= first
    assert r.zscore(keys.groups, "g1") == second
    assert r.hget(keys.group_info("g1"), "running") == b"5"
    assert r.hget(keys.group_info("g1"), "heartbeat_ms") == str(second).encode()
    assert sorted(r.zrange(keys.groups, 0, -1)) == [b"g1", b"g2"]


def test_pack_events_flattens_fields() -> None:
    import msgpack

    data = pack_events([("t", 0, {"token_id": "7", "text": "x"}), ("f", 0, {"event": "done"})])
    assert msgpack.unpackb(data, raw=False) == [
        ["t", 0, ["token_id", "7", "text", "x"], 7, "x"], ["f", 0, ["event", "done"]]]


def test_callers_that_pass_no_record_keys_still_work(r: redis.Redis, scripts: Scripts, keys: Keys,
                                                      reply: str, state: str) -> None:
    # Older callers (or other tools) pass only reply + state, and only the queue's first three keys.
    assert scripts.claim_owner(progress=Progress(state), group="g1", ttl_ms=TTL_MS)[:3] == [b"g1", 1, 0]
    raw = scripts.publish(reply_stream=reply, progress=Progress(state), publisher="g1", epoch=1, ttl_ms=TTL_MS,
                          events=pack_events([tok(0), done()]))
    assert publish_result(raw) == PublishResult("ok", 1)
    r.set(keys.group_accepting("g1"), 1)
    status = scripts.dispatch(queue=keys.group_queue("g1"), marker=keys.dispatch_marker("g1", RID, 1),
                              accepting=keys.group_accepting("g1"), queue_tokens=None, request=b"x", epoch=1,
                              marker_ttl_ms=TTL_MS)
    assert status[0] == b"ok"
