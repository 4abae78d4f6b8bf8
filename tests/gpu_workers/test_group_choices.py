"""A worker group serving requests with several completions (n > 1, best_of) and prompt logprobs,
on the real test Redis: per-completion token events, exactly one final event carrying every
completion, a move between groups mid-stream, cancellation, and best_of's ranking."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import redis

from broker.events import token_event
from broker.keys import Keys
from broker.protocol import GenerationRequest, SamplingParams
from broker.scripts import Scripts, claim_result, pack_events
from broker.settings import Settings
from gpu_workers.echo import EchoEngine
from gpu_workers.engine import EngineRequest
from gpu_workers.engine_mapping import engine_sampling
from gpu_workers.group import WorkerGroup
from gpu_workers.output import OutputState
from gpu_workers.tokenizer import ByteTokenizer
from tests.gpu_workers.helpers import (
    FakeMonotonic,
    dispatch,
    enqueue,
    events,
    finals,
    run_until,
    take_over,
    tokens,
)
from tests.gpu_workers.reference import save_hf_model
from tests.gpu_workers.test_llm_engine import engine_for


def group_of(r: redis.Redis, redis_url: str, prefix: str, mono: FakeMonotonic, engine: Any = None,
             name: str = "g1") -> WorkerGroup:
    settings = Settings(redis_url=redis_url, prefix=prefix, worker_block_ms=1)
    group = WorkerGroup(r, engine or EchoEngine(), settings=settings, name=name, monotonic=mono)
    group.register()
    return group


def request(keys: Keys, rid: str, prompt: str, *, stream: bool = True, **sampling: Any) -> GenerationRequest:
    return GenerationRequest(id=rid, prompt=prompt, sampling=SamplingParams(**{"max_tokens": 64, **sampling}),
                             stream=stream, reply_to=keys.result(rid))


def done_of(r: redis.Redis, reply: str) -> dict[str, str]:
    (final,) = finals(events(r, reply))
    assert events(r, reply)[-1] is not None and events(r, reply)[-1]["event"] == "done"
    return final


def per_choice(evs: list[dict[str, str]]) -> dict[int, list[dict[str, str]]]:
    out: dict[int, list[dict[str, str]]] = {}
    for e in tokens(evs):
        out.setdefault(int(e["choice"]), []).append(e)
    return out


def test_each_completion_streams_with_its_own_indices_and_the_done_carries_all(
        r: redis.Redis, redis_url: str, prefix: str, keys: Keys, mono: FakeMonotonic) -> None:
    group = group_of(r, redis_url, prefix, mono)
    req = request(keys, "n3", "abcd", n=3, max_tokens=3)
    enqueue(r, keys, "g1", req)
    run_until(group.tick, lambda: bool(finals(events(r, req.reply_to))))
    evs = events(r, req.reply_to)
    assert len(finals(evs)) == 1 and evs[-1]["event"] == "done"
    streams = per_choice(evs)
    assert sorted(streams) == [0, 1, 2]
    for toks in streams.values():
        assert [int(e["index"]) for e in toks] == [0, 1, 2]
        assert "".join(e["text"] for e in toks) == "abc"
        # the token that ends a completion says how (a non-final event: more may follow)
        assert [e.get("finish_reason") for e in toks] == [None, None, "length"]
    done = evs[-1]
    choices = json.loads(done["choices"])
    assert [(c["index"], c["text"], c["finish_reason"]) for c in choices] == [(i, "abc", "length") for i in range(3)]
    assert (done["text"], done["finish_reason"], done["completion_tokens"]) == ("abc", "length", "9")


def test_a_moved_request_continues_each_completion_after_what_its_stream_carried(
        r: redis.Redis, redis_url: str, prefix: str, keys: Keys, mono: FakeMonotonic) -> None:
    req = request(keys, "moved", "abcdef", n=3, max_tokens=3)
    r.set(keys.group_accepting("dead"), "1")
    epoch = enqueue(r, keys, "dead", req)
    published = {0: [97, 98], 1: [97], 2: [97, 98, 99]}  # the dead group's progress, interleaved
    states = [OutputState(sampling=req.sampling, prompt_ids=list(b"abcdef"), tokenizer=ByteTokenizer(),
                          eos_token_ids=frozenset(), max_context=1 << 20) for _ in range(3)]
    sent = []
    for step in range(3):
        for c, ids in published.items():
            if step < len(ids):
                res = states[c].push(ids[step])
                sent.append(("t", res.index, token_event(req.id, res.index, res.token_id, res.text, choice=c,
                                                         finish_reason=res.finish_reason)))
    assert Scripts(r).publish(reply_stream=req.reply_to, progress=keys.progress(req.reply_to, req.id),
                              publisher="dead", epoch=epoch, ttl_ms=60_000, events=pack_events(sent))[0] == b"ok"
    _owner, new_epoch = take_over(r, keys, req, to="g1", frm="dead", epoch=epoch)
    claim = claim_result(Scripts(r).claim_owner(progress=keys.progress(req.reply_to, req.id), group="g1",
                                                ttl_ms=60_000))
    assert claim.choice_ids == ((97, 98), (97,), (97, 98, 99)) and claim.choice_texts == ("ab", "a", "abc")
    group = group_of(r, redis_url, prefix, mono)
    dispatch(r, keys, "g1", req.model_copy(update={"choice_output_ids": claim.choice_ids}), new_epoch)
    run_until(group.tick, lambda: bool(finals(events(r, req.reply_to))))
    evs = events(r, req.reply_to)
    assert len(finals(evs)) == 1
    for c, toks in per_choice(evs).items():  # every index once, in order, across both groups
        assert [int(e["index"]) for e in toks] == [0, 1, 2]
        assert "".join(e["text"] for e in toks) == "abc"
    assert [c["text"] for c in json.loads(evs[-1]["choices"])] == ["abc"] * 3
    assert not r.exists(*keys.progress(req.reply_to, req.id)[1:])  # the records went with the final


def test_cancelling_ends_every_unfinished_completion_in_the_one_done(
        r: redis.Redis, redis_url: str, prefix: str, keys: Keys, mono: FakeMonotonic) -> None:
    group = group_of(r, redis_url, prefix, mono)
    req = request(keys, "c2", "abcdefghij", n=2)
    enqueue(r, keys, "g1", req)
    run_until(group.tick, lambda: len(tokens(events(r, req.reply_to))) >= 4)
    r.xadd(keys.cancel, {"id": req.id})
    run_until(group.tick, lambda: bool(finals(events(r, req.reply_to))))
    done = done_of(r, req.reply_to)
    assert done["finish_reason"] == "cancelled"
    assert [c["finish_reason"] for c in json.loads(done["choices"])] == ["cancelled", "cancelled"]
    assert not group.engine.has_work()


def test_prompt_logprobs_come_in_the_done_event(
        r: redis.Redis, redis_url: str, prefix: str, keys: Keys, mono: FakeMonotonic) -> None:
    group = group_of(r, redis_url, prefix, mono)
    req = request(keys, "pl", "hi!", stream=False, prompt_logprobs=1, max_tokens=1)
    enqueue(r, keys, "g1", req)
    run_until(group.tick, lambda: bool(finals(events(r, req.reply_to))))
    entries = json.loads(done_of(r, req.reply_to)["prompt_logprobs"])
    assert entries[0] is None
    assert [(e["token_id"], e["text"], e["logprob"]) for e in entries[1:]] == [(105, "i", 0.0), (33, "!", 0.0)]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_hf_model(tmp_path_factory.mktemp("group_choices"), seed=9)


def test_best_of_returns_the_n_completions_with_the_highest_cumulative_logprob(
        r: redis.Redis, redis_url: str, prefix: str, keys: Keys, mono: FakeMonotonic, model_dir: Path) -> None:
    group = group_of(r, redis_url, prefix, mono, engine=engine_for(model_dir))
    sampling = {"n": 2, "best_of": 4, "temperature": 1.5, "seed": 77, "max_tokens": 5, "ignore_eos": True}
    req = GenerationRequest(id="bo", prompt_ids=(5, 17, 99, 3, 42), sampling=SamplingParams(**sampling),
                            reply_to=keys.result("bo"))
    enqueue(r, keys, "g1", req)
    run_until(group.tick, lambda: bool(finals(events(r, req.reply_to))))
    done = done_of(r, req.reply_to)
    choices = json.loads(done["choices"])
    assert [c["index"] for c in choices] == [0, 1] and "logprobs" not in choices[0]
    # the four candidates, each alone: completion c has seed 77 + c
    candidates = []
    for c in range(4):
        engine = engine_for(model_dir)
        engine.add(EngineRequest("x", [5, 17, 99, 3, 42], engine_sampling(req.sampling.for_choice(c))))
        steps = [o for _ in range(5) for o in engine.step()]
        candidates.append(([o.token_id for o in steps], sum(o.logprobs.logprob for o in steps)))
    best = sorted(candidates, key=lambda t: t[1], reverse=True)[:2]
    assert [c["token_ids"] for c in choices] == [ids for ids, _ in best]
    assert [c["cumulative_logprob"] for c in choices] == pytest.approx([lp for _, lp in best], abs=1e-4)
    assert json.loads(done["token_ids"]) == best[0][0] and done["completion_tokens"] == "10"
