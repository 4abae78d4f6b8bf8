"""Structured output in the Llama engine on a random-weights model (its output is arbitrary, and
must still match): 50 seeded random JSON schemas always parse and validate; choices, regexes and
grammars hold; EOS only where the grammar accepts; a spec that does not compile ends its request
alone; the grammar state survives preemption and a move to another engine; constrained rows leave
the other rows of a batch exactly as they would be alone."""

from __future__ import annotations

import json
import random
import re
from pathlib import Path

import jsonschema
import pytest
import redis

from benchmarks.json_schemas import random_schemas
from broker.keys import Keys
from broker.settings import Settings
from broker.validation import parse_request
from gpu_workers.engine import EngineRequest, Rejection, StepOutput
from gpu_workers.engine_mapping import error_code
from gpu_workers.group import WorkerGroup
from gpu_workers.llm_engine import LlamaEngine
from gpu_workers.sampling_params import SamplingParams, StructuredSpec
from tests.gpu_workers.helpers import FakeMonotonic, enqueue, events, finals, run_until
from tests.gpu_workers.reference import save_hf_model
from tests.gpu_workers.test_llm_engine import engine_for

VOCAB, EOS = 320, 319  # bytes, 63 made-up words (ByteTokenizer), EOS
PROMPT = list(b"Answer in JSON: ")


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_hf_model(tmp_path_factory.mktemp("structured"), seed=3, vocab_size=VOCAB, eos_token_id=EOS)


def sampling(structured: StructuredSpec | None, **kw: object) -> SamplingParams:
    return SamplingParams(**{"max_tokens": 600, "temperature": 1.0, "structured": structured, **kw})  # type: ignore[arg-type]


def json_schema(schema: dict[str, object]) -> StructuredSpec:
    return StructuredSpec(kind="json", spec=json.dumps(schema))


def run(engine: LlamaEngine, requests: list[EngineRequest], *, max_steps: int = 3000
        ) -> tuple[dict[str, list[int]], dict[str, str], list[Rejection]]:
    """Step until done: each request's tokens, finish reasons and the engine's rejections."""
    tokens: dict[str, list[int]] = {r.request_id: [] for r in requests}
    finished: dict[str, str] = {}
    rejected: list[Rejection] = []
    for r in requests:
        engine.add(r)
    for _ in range(max_steps):
        if not engine.has_work():
            break
        step: list[StepOutput] = engine.step()
        rejected += engine.rejected()
        for out in step:
            assert out.request_id not in finished
            tokens[out.request_id].append(out.token_id)
            if out.finish_reason is not None:
                finished[out.request_id] = out.finish_reason
    assert not engine.has_work()
    return tokens, finished, rejected


def text(engine: LlamaEngine, ids: list[int]) -> str:
    return engine.tokenizer.decode(ids)


@pytest.mark.slow
def test_fifty_random_schemas_always_parse_and_validate(model_dir: Path) -> None:
    engine = engine_for(model_dir, kv_memory="32MiB")
    schemas = random_schemas(50, seed=18)
    requests = [EngineRequest(f"s{i}", PROMPT, sampling(json_schema(s), seed=i)) for i, s in enumerate(schemas)]
    # plain requests in the same batch: they must get exactly the tokens they get alone
    plain = [EngineRequest(f"p{i}", PROMPT, sampling(None, seed=100 + i, max_tokens=40, ignore_eos=True))
             for i in range(3)]
    tokens, finished, rejected = run(engine, requests + plain)
    assert rejected == []
    for i, schema in enumerate(schemas):
        # ended where the grammar is complete (EOS allowed only there, or nothing else possible)
        assert finished[f"s{i}"] == "stop", (schema, text(engine, tokens[f"s{i}"]))
        jsonschema.validate(json.loads(text(engine, tokens[f"s{i}"])), schema)
    alone, _, _ = run(engine_for(model_dir, kv_memory="32MiB"), plain)
    assert {r.request_id: tokens[r.request_id] for r in plain} == alone


def test_choice_regex_and_grammars_hold(model_dir: Path) -> None:
    engine = engine_for(model_dir)
    choices = ["alpha", "beta", "a longer choice", "dé\"jà"]
    specs = {
        "choice": StructuredSpec(kind="choice", spec=json.dumps(choices), field="guided_choice"),
        "regex": StructuredSpec(kind="regex", spec=r"[A-Z][a-z]{2,6}-[0-9]{3}", field="guided_regex"),
        "ebnf": StructuredSpec(kind="grammar", spec='root ::= "(" num (" + " num)* ")"\nnum ::= [1-9] [0-9]?',
                                 field="guided_grammar"),
        "lark": StructuredSpec(kind="grammar", spec='start: "yes" | "no" | "maybe " NUM\nNUM: /[0-9]{1,2}/',
                                 field="guided_grammar"),
    }
    requests = [EngineRequest(f"{name}{k}", PROMPT, sampling(spec, seed=k, max_tokens=200))
                for name, spec in specs.items() for k in range(4)]
    tokens, finished, rejected = run(engine, requests)
    assert rejected == [] and set(finished.values()) == {"stop"}
    got = {rid: text(engine, ids) for rid, ids in tokens.items()}  # (EOS decodes to nothing)
    for k in range(4):
        assert got[f"choice{k}"] in choices
        assert re.fullmatch(r"[A-Z][a-z]{2,6}-[0-9]{3}", got[f"regex{k}"]), got[f"regex{k}"]
        assert re.fullmatch(r"\([1-9][0-9]?( \+ [1-9][0-9]?)*\)", got[f"ebnf{k}"]), got[f"ebnf{k}"]
        assert re.fullmatch(r"yes|no|maybe [0-9]{1,2}", got[f"lark{k}"]), got[f"lark{k}"]


def test_eos_only_where_the_grammar_accepts(model_dir: Path) -> None:
    """EOS biased to certainty still waits for the regex's fifth letter; then it ends the request."""
    engine = engine_for(model_dir)
    regex = StructuredSpec(kind="regex", spec="[a-z]{5,9}", field="guided_regex")
    tokens, finished, _ = run(engine, [EngineRequest("r", PROMPT, sampling(regex, seed=1, logit_bias=((EOS, 100.0),)))])
    assert finished["r"] == "stop" and tokens["r"][-1] == EOS
    assert re.fullmatch("[a-z]{5}", text(engine, tokens["r"][:-1]))


def test_the_grammar_wins_over_controls_that_leave_nothing(model_dir: Path) -> None:
    """min_tokens bans EOS, which is all a finished choice allows; ignore_eos would go on past it:
    the request still ends with exactly the choice."""
    engine = engine_for(model_dir)
    choice = StructuredSpec(kind="choice", spec='["ok"]', field="guided_choice")
    requests = [EngineRequest("min", PROMPT, sampling(choice, seed=2, min_tokens=8)),
                EngineRequest("ign", PROMPT, sampling(choice, seed=3, ignore_eos=True)),
                EngineRequest("bad", PROMPT, sampling(choice, seed=4, bad_words=("k",)))]
    tokens, finished, rejected = run(engine, requests)
    assert rejected == []
    for rid in ("min", "ign", "bad"):
        assert finished[rid] == "stop"
        assert text(engine, tokens[rid]) == "ok", rid


def test_a_spec_that_does_not_compile_ends_its_request_alone(model_dir: Path) -> None:
    engine = engine_for(model_dir)
    good = json_schema({"type": "object", "properties": {"a": {"type": "boolean"}}, "required": ["a"]})
    requests = [
        EngineRequest("bad-type", PROMPT, sampling(json_schema({"type": "frobnicate"}))),
        EngineRequest("bad-regex", PROMPT, sampling(StructuredSpec(kind="regex", spec="a(", field="guided_regex"))),
        EngineRequest("bad-grammar", PROMPT, sampling(StructuredSpec(kind="grammar", spec="root ::= missing",
                                                                       field="guided_grammar"))),
        EngineRequest("good", PROMPT, sampling(good, seed=5)),
        EngineRequest("plain", PROMPT, sampling(None, seed=6, max_tokens=5, ignore_eos=True)),
    ]
    tokens, finished, rejected = run(engine, requests)
    by_id = {r.request_id: r for r in rejected}
    assert set(by_id) == {"bad-type", "bad-regex", "bad-grammar"}
    assert all(error_code(r.reason) == "invalid_request" for r in rejected)
    assert "'guided_json'" in by_id["bad-type"].message and "frobnicate" in by_id["bad-type"].message, by_id
    assert "'guided_regex'" in by_id["bad-regex"].message and "unclosed group" in by_id["bad-regex"].message
    assert "'guided_grammar'" in by_id["bad-grammar"].message and "missing" in by_id["bad-grammar"].message
    assert not any(tokens[rid] for rid in by_id)
    assert finished == {"good": "stop", "plain": "length"}
    assert json.loads(text(engine, tokens["good"])).keys() == {"a"}
    assert engine.stats().waiting == engine.stats().running == 0


@pytest.mark.slow
def test_the_grammar_survives_preemption(model_dir: Path) -> None:
    """A cache of 12 blocks for 6 growing sequences: the scheduler preempts and recomputes; the
    tokens (seeded) are those of a roomy cache, and every document validates."""
    schemas = random_schemas(6, seed=7)
    requests = [EngineRequest(f"s{i}", PROMPT * 3, sampling(json_schema(s), seed=i)) for i, s in enumerate(schemas)]
    roomy, _, _ = run(engine_for(model_dir, kv_memory="32MiB"), requests)
    block_bytes = 2 * 2 * 16 * 2 * 16 * 4  # layers, K and V, block of 16 tokens, 2 KV heads of 16, fp32
    tight = engine_for(model_dir, kv_memory=str(12 * block_bytes), max_num_seqs=6)
    tokens, finished, rejected = run(tight, requests)
    assert tight.stats().num_preemptions > 0
    assert rejected == [] and tokens == roomy
    for i, schema in enumerate(schemas):
        assert finished[f"s{i}"] == "stop"
        jsonschema.validate(json.loads(text(tight, tokens[f"s{i}"])), schema)


def test_a_moved_request_continues_its_grammar_on_another_engine(model_dir: Path) -> None:
    """The new engine's matcher is advanced over the tokens generated before the move: the request
    ends as it would have without moving (seeded sampling), and the document validates."""
    schema = random_schemas(3, seed=11)[2]
    request = EngineRequest("m", PROMPT, sampling(json_schema(schema), seed=42))
    whole, _, _ = run(engine_for(model_dir), [request])
    assert len(whole["m"]) > 6
    first = engine_for(model_dir)
    first.add(request)
    before: list[int] = []
    while len(before) < 5:
        before += [o.token_id for o in first.step()]
    first.abort("m")
    moved = EngineRequest("m", PROMPT, request.sampling, output_ids=before)
    after, finished, rejected = run(engine_for(model_dir), [moved])
    assert rejected == [] and finished == {"m": "stop"}
    assert before + after["m"] == whole["m"]
    engine = engine_for(model_dir)
    jsonschema.validate(json.loads(text(engine, whole["m"])), schema)
    # tokens that do not match the grammar (another request's) are refused by name, not continued
    stray = EngineRequest("x", PROMPT, request.sampling, output_ids=list(b"not json"))
    _, _, rejected = run(engine, [stray])
    assert [error_code(r.reason) for r in rejected] == ["invalid_request"] and "moved" in rejected[0].message


def test_random_draws_stay_reproducible_under_a_grammar(model_dir: Path) -> None:
    schema = random_schemas(1, seed=random.Random(5).randrange(1000))[0]
    request = EngineRequest("a", PROMPT, sampling(json_schema(schema), seed=9))
    first, _, _ = run(engine_for(model_dir), [request])
    again, _, _ = run(engine_for(model_dir), [request])
    assert first == again


def test_a_group_answers_a_spec_that_does_not_compile_with_invalid_request(
        r: redis.Redis, redis_url: str, prefix: str, keys: Keys, mono: FakeMonotonic, model_dir: Path) -> None:
    """Through a worker group on the real test Redis: the error event names the field the client
    sent; the constrained request beside it completes."""
    engine = engine_for(model_dir)
    group = WorkerGroup(r, engine, settings=Settings(redis_url=redis_url, prefix=prefix, worker_block_ms=1),
                        name="g1", monotonic=mono)
    group.register()
    bad = parse_request({"id": "bad", "prompt": "x", "response_format": json.dumps(
        {"type": "json_schema", "json_schema": {"name": "s", "schema": {"type": "frobnicate"}}})},
        entry_id="1-0", prefix=prefix, max_request_bytes=1 << 20)
    good = parse_request({"id": "good", "prompt": "x", "guided_choice": '["up", "down"]', "max_tokens": "20",
                          "temperature": "0"}, entry_id="1-1", prefix=prefix, max_request_bytes=1 << 20)
    for request in (bad, good):
        enqueue(r, keys, "g1", request)
    run_until(group.tick, lambda: all(finals(events(r, keys.result(x))) for x in ("bad", "good")), limit=500)
    (error,) = events(r, keys.result("bad"))
    assert (error["event"], error["code"]) == ("error", "invalid_request")
    assert "'response_format'" in error["message"] and "frobnicate" in error["message"]
    done = finals(events(r, keys.result("good")))[0]
    assert done["event"] == "done" and done["text"] in ("up", "down") and done["finish_reason"] == "stop"


def test_every_completion_of_n_matches_its_schema(
        r: redis.Redis, redis_url: str, prefix: str, keys: Keys, mono: FakeMonotonic, model_dir: Path) -> None:
    """n=3 with a schema, through a worker group: each completion has its own matcher (the
    compiled grammar is shared), and each validates."""
    schema = random_schemas(5, seed=31)[4]
    group = WorkerGroup(r, engine_for(model_dir), settings=Settings(redis_url=redis_url, prefix=prefix,
                                                                   worker_block_ms=1), name="g1", monotonic=mono)
    group.register()
    request = parse_request({"id": "n3", "prompt": "x", "guided_json": json.dumps(schema), "n": "3", "seed": "4",
                             "max_tokens": "600", "stream": "1"}, entry_id="1-0", prefix=prefix,
                            max_request_bytes=1 << 20)
    enqueue(r, keys, "g1", request)
    run_until(group.tick, lambda: bool(finals(events(r, keys.result("n3")))), limit=3000)
    done = finals(events(r, keys.result("n3")))[0]
    assert done["event"] == "done", done
    choices = json.loads(done["choices"])
    assert len(choices) == 3 and len({c["text"] for c in choices}) > 1
    for choice in choices:
        assert choice["finish_reason"] == "stop"
        jsonschema.validate(json.loads(choice["text"]), schema)
