"""Several completions (n, best_of) and prompt logprobs on the wire (PROTOCOL.md, "Several
completions", "Prompt logprobs"): parsing, per-completion parameters, the events, PUBLISH's
per-completion indices and what a new owner reads back (CLAIM_OWNER)."""

from __future__ import annotations

import json

import pytest
import redis

from balancer.pending import Final
from broker.events import choice_entry, done_event, error_event, token_event
from broker.keys import Keys
from broker.protocol import GenerationRequest, SamplingParams
from broker.scripts import Claim, Scripts, claim_result, pack_events
from tests.broker.test_protocol import parse, parse_payload, rejected

BASE = {"prompt": "hi"}


def test_flat_fields_and_msgpack() -> None:
    s = parse({**BASE, "n": "3", "best_of": "5", "prompt_logprobs": "2"}).sampling
    assert (s.n, s.best_of, s.prompt_logprobs, s.num_sequences) == (3, 5, 2, 5)
    s = parse_payload({"prompt": "hi", "n": 2, "prompt_logprobs": 0}).sampling
    assert (s.n, s.best_of, s.prompt_logprobs, s.num_sequences) == (2, None, 0, 2)
    assert parse(BASE).sampling.prompt_logprobs is None and parse(BASE).sampling.num_sequences == 1


@pytest.mark.parametrize(("fields", "name"), [
    ({"n": "0"}, "n"), ({"n": "129"}, "n"), ({"n": "1.5"}, "n"), ({"best_of": "0"}, "best_of"),
    ({"n": "3", "best_of": "2"}, "best_of"), ({"n": "2", "best_of": "3", "stream": "1"}, "best_of"),
    ({"prompt_logprobs": "-1"}, "prompt_logprobs"), ({"prompt_logprobs": "21"}, "prompt_logprobs"),
])
def test_bad_values_name_the_field(fields: dict[str, str], name: str) -> None:
    rejected({**BASE, **fields}, name)


def test_best_of_equal_to_n_may_stream() -> None:
    assert parse({**BASE, "n": "2", "best_of": "2", "stream": "1"}).stream


def test_each_completion_gets_seed_plus_index_and_the_leader_alone_prompt_logprobs() -> None:
    s = SamplingParams(n=3, seed=10, prompt_logprobs=1)
    assert [s.for_choice(c, leader=c == 0).seed for c in range(3)] == [10, 11, 12]
    assert [s.for_choice(c, leader=c == 0).prompt_logprobs for c in range(3)] == [1, None, None]
    assert all(s.for_choice(c).n == 1 and not s.for_choice(c).logprobs for c in range(3))
    ranked = SamplingParams(n=1, best_of=3)
    assert ranked.for_choice(2).logprobs and ranked.for_choice(2).seed is None  # best_of ranks by logprobs
    assert SamplingParams(seed=5).for_choice(0) == SamplingParams(seed=5)  # n=1: unchanged
    assert SamplingParams(n=2, seed=(1 << 64) - 1).for_choice(1).seed == 0  # wraps within the seed range


def test_round_trips_through_the_group_queue_and_re_enqueueing() -> None:
    req = parse({**BASE, "n": "2", "best_of": "4", "prompt_logprobs": "3"})
    moved = req.model_copy(update={"choice_output_ids": ((1, 2), (), (3,), (4, 5))})
    assert GenerationRequest.from_wire(moved.to_wire()) == moved
    again = parse_request_fields(req.to_ingress(from_owner="g", epoch=2, signing_key=b"k"))
    assert again.sampling == req.sampling


def parse_request_fields(fields: dict[str, bytes | str]) -> GenerationRequest:
    from broker.validation import parse_request
    return parse_request({k.encode(): v for k, v in fields.items()}, entry_id="1700000000000-5", prefix="ryz",
                         max_request_bytes=1 << 20, signing_key=b"k")


def test_events() -> None:
    event = token_event("r", 4, 104, "h", choice=2, finish_reason="stop")
    assert (event["index"], event["choice"], event["finish_reason"]) == ("4", "2", "stop")
    assert "choice" not in token_event("r", 0, 1, "x") and "finish_reason" not in token_event("r", 0, 1, "x")
    choices = [choice_entry(0, text="ab", token_ids=[1, 2], finish_reason="stop", cumulative_logprob=-1.5),
               choice_entry(1, text="c", token_ids=[3], finish_reason="length", logprobs=[None])]
    done = done_event("r", text="ab", token_ids=[1, 2], finish_reason="stop", prompt_tokens=4, choices=choices,
                      prompt_logprobs=[None, {"token_id": 9, "text": "x", "logprob": -0.5, "top_logprobs": []}])
    assert done["completion_tokens"] == "3" and json.loads(done["choices"]) == choices
    assert json.loads(done["prompt_logprobs"])[0] is None
    assert "choices" not in done_event("r", text="", token_ids=[], finish_reason="stop", prompt_tokens=1)


def test_publish_counts_indices_per_completion_and_a_new_owner_reads_each_back(r: redis.Redis, keys: Keys) -> None:
    scripts = Scripts(r)
    reply = keys.result("m")
    progress = keys.progress(reply, "m")
    claim = claim_result(scripts.claim_owner(progress=progress, group="g1", ttl_ms=60_000))

    def publish(events: list[tuple[int, int, int, str]]) -> bytes:
        packed_events = pack_events([("t", i, token_event("m", i, t, text, choice=c)) for c, i, t, text in events])
        return scripts.publish(reply_stream=reply, progress=progress, publisher="g1", epoch=claim.epoch,
                               ttl_ms=60_000, events=packed_events)[0]

    assert publish([(0, 0, 10, "é"), (1, 0, 20, "b"), (0, 1, 11, "x")]) == b"ok"
    assert publish([(0, 1, 11, "x"), (1, 1, 21, ""), (0, 2, 12, "ü")]) == b"ok"  # (0, 1) again: dropped
    assert publish([(1, 3, 23, "z")]) == b"gap"  # completion 1 is at index 2
    written = [(e[b"choice"], e[b"index"]) for _id, e in r.xrange(reply)]
    assert written == [(b"0", b"0"), (b"1", b"0"), (b"0", b"1"), (b"1", b"1"), (b"0", b"2")]
    again = claim_result(scripts.claim_owner(progress=progress, group="g2", ttl_ms=60_000, taken_from="g1",
                                             taken_from_epoch=claim.epoch))
    assert again.choice_ids == ((10, 11, 12), (20, 21)) and again.choice_texts == ("éxü", "b")
    assert again.output_ids == () and again.owner == "g2"
    final = pack_events([("f", 0, done_event("m", text="", token_ids=[], finish_reason="stop", prompt_tokens=1))])
    assert scripts.publish(reply_stream=reply, progress=progress, publisher="g2", epoch=again.epoch, ttl_ms=60_000,
                           events=final)[0] == b"ok"
    assert not r.exists(progress.generated, progress.generated_text)


def test_a_cancel_while_moving_reports_each_completion_as_its_stream_carried() -> None:
    final = Final(b"1-0", "m", "ryz:result:m", done_event("m", text="", token_ids=[], finish_reason="cancelled",
                                                            prompt_tokens=0))
    fields = final.with_progress(Claim("g", 2, False, choice_ids=((1, 2), (3,)), choice_texts=("ab", "c")))
    assert [(c["text"], c["token_ids"], c["finish_reason"]) for c in json.loads(fields["choices"])] == [
        ("ab", [1, 2], "cancelled"), ("c", [3], "cancelled")]
    assert (fields["text"], fields["completion_tokens"]) == ("ab", "3")
    error = Final(b"1-0", "m", "ryz:result:m", error_event("m", "timeout", "late"))
    assert error.with_progress(Claim("g", 2, False, choice_ids=((1,),), choice_texts=("a",))) == error.fields


