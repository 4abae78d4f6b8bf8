"""The sampling-control fields of a request (PROTOCOL.md, "Sampling controls"): flat and msgpack
forms, bounds that name the field, and round trips through the group queue and re-enqueueing."""

from __future__ import annotations

import json
from typing import Any

import msgpack
import pytest

from broker.errors import InvalidRequest
from broker.protocol import MAX_BAD_WORDS, MAX_LOGIT_BIAS, GenerationRequest, limit_problem
from broker.refused import UNHONOURED_FIELDS
from broker.validation import parse_request
from tests.broker.test_protocol import packed, parse, rejected

BASE = {"prompt": "hi"}


def test_defaults_change_nothing() -> None:
    s = parse(BASE).sampling
    assert (s.presence_penalty, s.frequency_penalty, s.repetition_penalty, s.min_p) == (0.0, 0.0, 1.0, 0.0)
    assert (s.min_tokens, s.ignore_eos, s.logit_bias, s.bad_words) == (0, False, (), ())


def test_flat_fields_as_redis_cli_sends_them() -> None:
    s = parse({**BASE, "presence_penalty": "0.5", "frequency_penalty": "-1.25", "repetition_penalty": "1.5",
               "min_p": "0.1", "min_tokens": "3", "max_tokens": "8", "ignore_eos": "true",
               "logit_bias": '{"50256": -100, "7": 2.5}', "bad_words": '["foo", "bar baz"]'}).sampling
    assert (s.presence_penalty, s.frequency_penalty, s.repetition_penalty, s.min_p) == (0.5, -1.25, 1.5, 0.1)
    assert (s.min_tokens, s.ignore_eos) == (3, True)
    assert s.logit_bias == ((7, 2.5), (50256, -100.0))
    assert s.bad_words == ("foo", "bar baz")


def test_msgpack_form_takes_native_values() -> None:
    fields = packed({"prompt": "hi", "repetition_penalty": 2, "ignore_eos": True, "min_tokens": 2,
                     "logit_bias": {5: 1.5, "9": -3}, "bad_words": ["x"]})
    s = parse_request(fields, entry_id="1-0", prefix="ryz", max_request_bytes=1 << 20).sampling
    assert (s.repetition_penalty, s.ignore_eos, s.min_tokens) == (2.0, True, 2)
    assert s.logit_bias == ((5, 1.5), (9, -3.0)) and s.bad_words == ("x",)


@pytest.mark.parametrize("field,value", [
    ("presence_penalty", "2.5"), ("presence_penalty", "-2.01"), ("presence_penalty", "x"),
    ("frequency_penalty", "3"), ("frequency_penalty", "nan"),
    ("repetition_penalty", "0"), ("repetition_penalty", "-1"), ("repetition_penalty", "2.5"),
    ("min_p", "-0.1"), ("min_p", "1.5"),
    ("min_tokens", "-1"), ("min_tokens", "1.5"), ("min_tokens", "17"),
    ("ignore_eos", "maybe"),
    ("logit_bias", "[1, 2]"), ("logit_bias", "{"), ("logit_bias", '{"a": 1}'), ("logit_bias", '{"-1": 1}'),
    ("logit_bias", '{"5": 101}'), ("logit_bias", '{"5": "x"}'), ("logit_bias", '{"5": true}'),
    ("bad_words", '"foo"'), ("bad_words", '[""]'), ("bad_words", '["  "]'), ("bad_words", "[1]"),
])
def test_bad_values_name_the_field(field: str, value: str) -> None:
    rejected({**BASE, "max_tokens": "16", field: value}, field)


def test_limits_on_sizes() -> None:
    bias = json.dumps({str(i): 1 for i in range(MAX_LOGIT_BIAS + 1)})
    assert "at most" in rejected({**BASE, "logit_bias": bias}, "logit_bias")
    words = json.dumps(["w"] * (MAX_BAD_WORDS + 1))
    assert "at most" in rejected({**BASE, "bad_words": words}, "bad_words")


def test_min_tokens_may_not_exceed_max_tokens() -> None:
    assert parse({**BASE, "max_tokens": "5", "min_tokens": "5"}).sampling.min_tokens == 5
    assert "max_tokens" in rejected({**BASE, "max_tokens": "5", "min_tokens": "6"}, "min_tokens")


def test_fit_max_tokens_makes_max_tokens_a_ceiling() -> None:
    fitted = parse({**BASE, "max_tokens": "100", "fit_max_tokens": "1"}).sampling
    assert (fitted.max_tokens, fitted.fit_max_tokens, fitted.needed_tokens) == (100, True, 1)
    assert parse({**BASE, "max_tokens": "100"}).sampling.needed_tokens == 100
    prompt = [1] * 40
    assert "exceeds" in limit_problem(prompt, 100, vocab_size=10, max_context=50)  # type: ignore[operator]
    assert limit_problem(prompt, fitted.needed_tokens, vocab_size=10, max_context=50) is None
    assert "exceeds" in limit_problem([1] * 50, 1, vocab_size=10, max_context=50)  # type: ignore[operator]


def test_logit_bias_ids_are_checked_against_the_vocabulary() -> None:
    assert limit_problem([1], 4, vocab_size=100, max_context=50, logit_bias=((99, 1.0),)) is None
    problem = limit_problem([1], 4, vocab_size=100, max_context=50, logit_bias=((3, 1.0), (100, 1.0)))
    assert problem is not None and "logit_bias" in problem and "100" in problem


def controlled_request() -> GenerationRequest:
    return parse({**BASE, "id": "c1", "presence_penalty": "0.5", "repetition_penalty": "1.2", "min_p": "0.05",
                  "min_tokens": "2", "ignore_eos": "1", "logit_bias": '{"3": -4, "12": 0.5}',
                  "bad_words": '["no"]', "stop": '["."]'})


def test_group_queue_round_trip_keeps_the_controls() -> None:
    req = controlled_request()
    assert GenerationRequest.from_wire(req.to_wire()) == req


def test_re_enqueued_request_keeps_the_controls() -> None:
    req = controlled_request()
    fields: dict[Any, Any] = req.to_ingress(from_owner="g-1", epoch=3, signing_key=b"k")
    assert "logit_bias" in msgpack.unpackb(fields["payload"], raw=False)
    again = parse_fields(fields)
    assert again.sampling == req.sampling


def parse_fields(fields: dict[Any, Any]) -> GenerationRequest:
    return parse_request({k.encode(): v for k, v in fields.items()}, entry_id="1700000000000-5", prefix="ryz",
                         max_request_bytes=1 << 20, signing_key=b"k")


# --- fields known elsewhere and not honoured here -------------------------------------------------

REFUSED = [  # (field, a value that would change the output)
    ("use_beam_search", "true"), ("length_penalty", "0.5"), ("allowed_token_ids", "[1, 2]"),
    ("logits_processors", '["x"]'), ("guided_whitespace_pattern", " +"), ("include_stop_str_in_output", "1"),
    ("skip_special_tokens", "false"), ("spaces_between_special_tokens", "0"), ("truncate_prompt_tokens", "10"),
]
NEUTRAL = [  # (field, as a flat field, as a native msgpack value)
    ("n", "1", 1), ("best_of", "1", 1), ("use_beam_search", "False", False), ("length_penalty", "1.0", 1.0),
    ("response_format", '{"type": "text"}', {"type": "text"}),
    ("response_format", "text", "text"), ("include_stop_str_in_output", "false", False),
    ("skip_special_tokens", "true", True), ("guided_json", "null", None),
]


def test_the_refusal_table_is_covered() -> None:
    assert {name for name, _ in REFUSED} == set(UNHONOURED_FIELDS)


@pytest.mark.parametrize("field,value", REFUSED)
def test_every_unhonoured_field_is_refused_by_name(field: str, value: str) -> None:
    assert "not supported" in rejected({**BASE, field: value}, field)
    # the msgpack form too, with the value as a native msgpack value where it is JSON
    try:
        native = json.loads(value)
    except ValueError:
        native = value
    with pytest.raises(InvalidRequest) as caught:
        parse_request(packed({"prompt": "hi", field: native}), entry_id="1-0", prefix="ryz",
                      max_request_bytes=1 << 20)
    assert f"'{field}'" in str(caught.value)


@pytest.mark.parametrize("field,flat,native", NEUTRAL)
def test_neutral_values_of_unhonoured_fields_are_accepted(field: str, flat: str, native: Any) -> None:
    assert parse({**BASE, field: flat}).prompt == "hi"
    fields = packed({"prompt": "hi", field: native})
    assert parse_request(fields, entry_id="1-0", prefix="ryz", max_request_bytes=1 << 20).prompt == "hi"


def test_unknown_fields_stay_ignored() -> None:
    assert parse({**BASE, "frobnicate": "yes", "guided_decoding_backend": "xgrammar"}).prompt == "hi"
