"""Several models on one pipeline: the balancer sends each request only to groups of its model,
waits and fails over within that model, and never lets a moved request continue on other weights.

Fake groups (registry entries and queues, read directly) or real echo WorkerGroups, on the real test
Redis; time passed in.
"""

from __future__ import annotations

import json
from collections.abc import Callable

import pytest
import redis

from broker.chat import PLAIN_CHAT_TEMPLATE, read_template
from broker.keys import QUEUE_GROUP, Keys
from broker.protocol import GenerationRequest
from broker.settings import Settings
from gpu_workers.echo import EchoEngine
from gpu_workers.group import CONSUMER, WorkerGroup
from tests.balancer import test_service
from tests.balancer.test_service import (
    MakeBalancer,
    fake_group,
    fill,
    only_error,
    queued,
    record_read_blocks,
    settled,
    state,
    submit,
)
from tests.gpu_workers.helpers import (
    FakeClock,
    FakeMonotonic,
    assert_one_clean_completion,
    events,
    finals,
    queue_fields,
    run_until,
)

make_settings = test_service.make_settings  # fixtures
make_balancer = test_service.make_balancer


def queued_ids(r: redis.Redis, keys: Keys, group: str) -> list[str]:
    return sorted(q.id for q, _epoch in queued(r, keys, group))


def test_each_request_goes_only_to_groups_of_its_model(
        r: redis.Redis, keys: Keys, make_balancer: MakeBalancer) -> None:
    fake_group(r, keys, "a1", served=["model-a", "alias-a"])
    fake_group(r, keys, "b1", served=["model-b"])
    fake_group(r, keys, "b2", served=["model-b"])
    balancer = make_balancer()
    for n in range(60):
        submit(r, keys, id=f"a{n}", prompt=f"p{n}", model="model-a" if n % 2 else "alias-a")
        submit(r, keys, id=f"b{n}", prompt=f"p{n}", model="model-b")
    for _ in range(3):
        balancer.tick()
    assert queued_ids(r, keys, "a1") == sorted(f"a{n}" for n in range(60))
    on_b = queued_ids(r, keys, "b1") + queued_ids(r, keys, "b2")
    assert sorted(on_b) == sorted(f"b{n}" for n in range(60))
    assert queued_ids(r, keys, "b1") and queued_ids(r, keys, "b2")  # spread over the model's groups
    # the name routed to travels with the request (it stays on its model when it moves)
    assert {q.model for q, _ in queued(r, keys, "a1")} == {"model-a", "alias-a"}
    assert {q.model for q, _ in queued(r, keys, "b1")} == {"model-b"}
    assert settled(balancer, r, keys)


def test_an_unknown_model_is_model_not_found_at_once(
        r: redis.Redis, keys: Keys, make_balancer: MakeBalancer) -> None:
    fake_group(r, keys, "a1", served=["model-a"])
    fake_group(r, keys, "b1", served=["model-b"])
    balancer = make_balancer()
    submit(r, keys, id="x", prompt="hi", model="smollm2")
    submit(r, keys, id="y", prompt="hi", model="model-a/../x")  # a name no group can serve either
    balancer.tick()
    error = only_error(r, keys.result("x"), "model_not_found")
    assert "'smollm2'" in error["message"] and "model-a, model-b" in error["message"]
    only_error(r, keys.result("y"), "model_not_found")
    assert not queued(r, keys, "a1") and not queued(r, keys, "b1")
    assert not balancer.waiting and settled(balancer, r, keys)


def test_a_malformed_model_name_is_invalid(r: redis.Redis, keys: Keys, make_balancer: MakeBalancer) -> None:
    fake_group(r, keys, "a1", served=["model-a"])
    balancer = make_balancer()
    for n, bad in enumerate(["", "two words", "x" * 257, "nul\x00"]):
        submit(r, keys, id=f"bad{n}", prompt="hi", model=bad)
    balancer.tick()
    for n in range(4):
        assert "field 'model'" in only_error(r, keys.result(f"bad{n}"), "invalid_request")["message"]


def test_without_model_the_only_model_else_the_default_else_an_error(
        r: redis.Redis, keys: Keys, make_balancer: MakeBalancer) -> None:
    fake_group(r, keys, "a1", served=["model-a"])
    balancer = make_balancer()
    submit(r, keys, id="only", prompt="hi")
    balancer.tick()
    assert queued_ids(r, keys, "a1") == ["only"]
    assert queued(r, keys, "a1")[0][0].model == "model-a"

    fake_group(r, keys, "b1", served=["model-b"])
    balancer.refresh_groups()
    submit(r, keys, id="which", prompt="hi")
    balancer.tick()
    error = only_error(r, keys.result("which"), "invalid_request")
    assert "'model': required" in error["message"] and "model-a, model-b" in error["message"]

    with_default = make_balancer("b2", default_model="model-b")
    submit(r, keys, id="dflt", prompt="hi")
    with_default.tick()
    assert queued_ids(r, keys, "b1") == ["dflt"]
    balancer.flush_acks()
    assert settled(with_default, r, keys)


def test_requests_for_a_model_whose_only_group_died_wait_for_that_model(
        r: redis.Redis, keys: Keys, make_balancer: MakeBalancer) -> None:
    fake_group(r, keys, "a1", served=["model-a"], age_s=10)  # its heartbeat stopped: dead
    fake_group(r, keys, "b1", served=["model-b"])
    balancer = make_balancer(no_group_wait_s=5.0, dead_after_s=3.0)
    t0 = 1_700_000_000_000
    balancer.clock = FakeClock(t0)  # type: ignore[assignment]
    submit(r, keys, id="a-early", prompt="for a", model="model-a")
    submit(r, keys, id="a-late", prompt="for a", model="model-a")
    submit(r, keys, id="b", prompt="for b", model="model-b")
    submit(r, keys, id="none", prompt="no model named")  # only model-b is live: it goes there
    balancer.tick()
    assert queued_ids(r, keys, "b1") == ["b", "none"]
    assert sorted(w.request.id for w in balancer.waiting.values()) == ["a-early", "a-late"]

    balancer.clock.ms = t0 + 4_000
    balancer.process([])
    assert queued_ids(r, keys, "b1") == ["b", "none"]  # nothing of model-a went to model-b
    fake_group(r, keys, "a2", served=["model-a"])  # a new group of model-a starts
    balancer.refresh_groups()
    balancer.process([])
    assert queued_ids(r, keys, "a2") == ["a-early", "a-late"]

    submit(r, keys, id="a-never", prompt="for a", model="model-a")
    r.delete(keys.group_accepting("a2"))
    fake_group(r, keys, "a2", served=["model-a"], state="draining", accepting=False)
    balancer.refresh_groups()
    balancer.tick()
    balancer.clock.ms = t0 + 9_999
    balancer.process([])
    assert "of model 'model-a'" in only_error(r, keys.result("a-never"), "unavailable")["message"]
    assert queued_ids(r, keys, "b1") == ["b", "none"]


def test_a_dead_groups_requests_fail_over_only_to_groups_of_its_model(
        r: redis.Redis, keys: Keys, make_balancer: MakeBalancer) -> None:
    fake_group(r, keys, "a1", served=["model-a"])
    balancer = make_balancer(dead_after_s=3.0)
    for n in range(5):
        submit(r, keys, id=f"f{n}", prompt="x", stream=1)  # no model: the only one, model-a
    balancer.tick()
    assert len(queued(r, keys, "a1")) == 5
    r.xgroup_create(keys.group_queue("a1"), QUEUE_GROUP, id="0")
    r.xreadgroup(QUEUE_GROUP, CONSUMER, {keys.group_queue("a1"): ">"}, count=2)  # two were in flight

    fake_group(r, keys, "a1", served=["model-a"], age_s=10)
    fake_group(r, keys, "b1", served=["model-b"])  # idle, and of another model
    fake_group(r, keys, "a2", served=["model-a"])
    fill(r, keys, "a2", 50)  # busy, but the only live group of model-a
    balancer.refresh_groups()
    balancer.tick()
    balancer.tick()
    assert [i for i in queued_ids(r, keys, "a2") if not i.startswith("other")] == [f"f{n}" for n in range(5)]
    assert not queued(r, keys, "b1")
    assert {state(r, keys, f"f{n}")["owner"] for n in range(5)} == {"a2"}


def test_admission_bounds_count_each_models_groups(
        r: redis.Redis, keys: Keys, make_balancer: MakeBalancer) -> None:
    fake_group(r, keys, "a1", served=["model-a"])
    fill(r, keys, "a1", 4)
    fake_group(r, keys, "b1", served=["model-b"])
    balancer = make_balancer(total_max_requests=4)
    submit(r, keys, id="a", prompt="x", model="model-a")
    submit(r, keys, id="b", prompt="x", model="model-b")
    balancer.tick()
    assert "of model 'model-a'" in only_error(r, keys.result("a"), "overloaded")["message"]
    assert queued_ids(r, keys, "b1") == ["b"]  # model-a at its bound does not hold model-b back


def test_a_moved_request_prefers_the_weights_that_began_it(
        r: redis.Redis, keys: Keys, make_balancer: MakeBalancer) -> None:
    fake_group(r, keys, "v1", served=["chat"], weights="w1", running=20)
    fake_group(r, keys, "v2", served=["chat"], weights="w2")
    balancer = make_balancer()
    submit(r, keys, id="fresh", prompt="x", model="chat")
    balancer.tick()
    [(fresh, _epoch)] = queued(r, keys, "v2")  # the less loaded group
    assert fresh.weights == "w2"  # stamped with the weights it runs on

    moving = GenerationRequest(id="moving", prompt="x", reply_to=keys.result("moving"), model="chat",
                               weights="w1")
    r.xadd(keys.requests, moving.to_ingress(from_owner="gone", epoch=0,
                                                       signing_key=balancer.signing.get()))
    balancer.tick()
    assert queued_ids(r, keys, "v1") == ["moving"]  # its own weights, though more loaded
    assert queued(r, keys, "v1")[0][0].weights == "w1"


def test_a_group_refuses_to_continue_tokens_made_by_other_weights(
        r: redis.Redis, keys: Keys, make_settings: Callable[..., Settings], mono: FakeMonotonic) -> None:
    group = WorkerGroup(r, EchoEngine(), settings=make_settings(), name="v2", monotonic=mono,
                        served_models=["chat"], weights="w2")
    group.register()
    for rid, weights in (("other", "w1"), ("same", "w2"), ("unstamped", None)):
        request = GenerationRequest(id=rid, prompt="abcdef", reply_to=keys.result(rid), stream=True,
                                    output_ids=tuple(b"abc"), weights=weights,
                                    sampling={"max_tokens": 6})  # type: ignore[arg-type]
        r.xadd(keys.group_queue("v2"), queue_fields(r, keys, request, 1, 1))
        r.hset(keys.state(keys.result(rid), rid), mapping={"owner": "v2", "epoch": "1", "next": "3"})
    run_until(group.tick, lambda: all(finals(events(r, keys.result(i))) for i in ("other", "same", "unstamped")))
    error = only_error(r, keys.result("other"), "unavailable")
    assert "other weights (w1)" in error["message"]
    for rid in ("same", "unstamped"):  # the same weights (or no stamp) continue after the 3 tokens
        done = finals(events(r, keys.result(rid)))[0]
        assert (done["text"], json.loads(done["token_ids"])) == ("abcdef", list(b"abcdef"))
    info = {k.decode(): v.decode() for k, v in r.hgetall(keys.group_info("v2")).items()}
    assert (info["served_models"], info["weights"]) == ('["chat"]', "w2")


def test_through_real_groups_of_two_echo_models(
        r: redis.Redis, keys: Keys, make_balancer: MakeBalancer, make_settings: Callable[..., Settings],
        mono: FakeMonotonic) -> None:
    groups = [WorkerGroup(r, EchoEngine(), settings=make_settings(), name=name, monotonic=mono,
                          served_models=[model], weights="echo")
              for name, model in (("ga", "echo-a"), ("gb", "echo-b"))]
    for g in groups:
        g.register()
    balancer = make_balancer()
    for n in range(40):
        submit(r, keys, id=f"r{n}", prompt=f"hello {n}", model="echo-a" if n % 2 else "echo-b", max_tokens=50)
    run_until(lambda: (balancer.tick(), [g.tick() for g in groups]),
              lambda: all(finals(events(r, keys.result(f"r{n}"))) for n in range(40)))
    for n in range(40):
        assert_one_clean_completion(events(r, keys.result(f"r{n}")), text=f"hello {n}", stream=False)
        assert state(r, keys, f"r{n}")["owner"] == ("ga" if n % 2 else "gb")


def test_requests_waiting_for_a_dead_model_do_not_make_the_balancer_spin(
        r: redis.Redis, keys: Keys, make_balancer: MakeBalancer, monkeypatch: pytest.MonkeyPatch) -> None:
    fake_group(r, keys, "a1", served=["model-a"], age_s=10)  # dead
    fake_group(r, keys, "b1", served=["model-b"])
    balancer = make_balancer(balancer_block_ms=7, dead_after_s=3.0)
    balancer.scripts.load()
    blocks = record_read_blocks(monkeypatch)
    submit(r, keys, id="a", prompt="x", model="model-a")
    balancer.tick()  # the blocking read takes one entry, then reads on without blocking (None)
    balancer.tick()  # it waits for model-a; model-b's live group cannot take it: block
    assert blocks == [7, None, 7] and list(balancer.waiting)
    fake_group(r, keys, "a2", served=["model-a"])
    balancer.refresh_groups()
    blocks.clear()
    balancer._read()
    assert blocks == [None]  # now it can go: do not wait for new entries


def test_a_group_publishes_its_chat_template_again_after_redis_lost_it(
        r: redis.Redis, keys: Keys, make_settings: Callable[..., Settings], mono: FakeMonotonic) -> None:
    group = WorkerGroup(r, EchoEngine(), settings=make_settings(), name="g", monotonic=mono)
    group.register()
    info = {k.decode(): v.decode() for k, v in r.hgetall(keys.group_info("g")).items()}
    assert read_template(r, keys, info["chat_template"]) == PLAIN_CHAT_TEMPLATE
    r.delete(keys.chat_template(info["chat_template"]))  # a Redis restarted without persistence
    mono.advance(29.0)
    group.heartbeat(force=True)
    assert read_template(r, keys, info["chat_template"]) is None
    mono.advance(1.0)
    group.heartbeat(force=True)
    assert read_template(r, keys, info["chat_template"]) == PLAIN_CHAT_TEMPLATE
