"""The ingress protocol (CONTRACT.md, "Requests") and the result event encoders."""

from __future__ import annotations

import json
import math
from typing import Any

import msgpack
import pytest
from pydantic import ValidationError

from broker.errors import InvalidRequest
from broker.events import FINAL_EVENTS, done_event, error_event, token_event
from broker.keys import Keys
from broker.protocol import (
    MAX_KEY_BYTES,
    MAX_STOP_STRINGS,
    GenerationRequest,
    SamplingParams,
    entry_ms,
    limit_problem,
)
from broker.signing import sign
from broker.validation import best_effort_reply_to, parse_request

PREFIX = "ryz"
ENTRY = "1700000000000-5"
ENTRY_MS = 1_700_000_000_000
LIMIT = 1 << 20


def wire(fields: dict[str, Any]) -> dict[bytes, bytes]:
    """Fields as a Redis client delivers them: bytes names, bytes values."""
    return {k.encode(): v if isinstance(v, bytes) else str(v).encode() for k, v in fields.items()}


def parse(fields: dict[str, Any], *, max_request_bytes: int = LIMIT, **kwargs: Any) -> GenerationRequest:
    return parse_request(
        wire(fields), entry_id=ENTRY, prefix=PREFIX, max_request_bytes=max_request_bytes, **kwargs
    )


def rejected(fields: dict[str, Any], field: str | None, **kwargs: Any) -> str:
    """Assert the entry is rejected with a message naming ``field``; returns the message."""
    with pytest.raises(InvalidRequest) as info:
        parse(fields, **kwargs)
    message = str(info.value)
    assert info.value.code == "invalid_request"
    if field is not None:
        assert f"'{field}'" in message, message
    return message


def packed(obj: Any, *, use_bin_type: bool = True) -> dict[bytes, bytes]:
    return {b"payload": msgpack.packb(obj, use_bin_type=use_bin_type)}


def parse_payload(obj: Any, *, use_bin_type: bool = True) -> GenerationRequest:
    return parse_request(
        packed(obj, use_bin_type=use_bin_type), entry_id=ENTRY, prefix=PREFIX, max_request_bytes=LIMIT
    )


def payload_rejected(obj: Any, field: str) -> str:
    with pytest.raises(InvalidRequest) as info:
        parse_payload(obj)
    assert f"'{field}'" in str(info.value), str(info.value)
    return str(info.value)


# --- defaults -------------------------------------------------------------------------------------


def test_minimal_request_gets_the_contract_defaults() -> None:
    req = parse({"prompt": "Hello"})
    assert req.id == ENTRY
    assert req.prompt == "Hello"
    assert req.prompt_ids is None
    assert req.sampling == SamplingParams(
        max_tokens=16, temperature=1.0, top_p=1.0, top_k=0, seed=None, stop=()
    )
    assert req.stream is False
    assert req.priority == 0
    assert req.timeout_s is None
    assert req.reply_to == f"{PREFIX}:result:{ENTRY}"
    assert req.enqueued_ms == ENTRY_MS
    assert req.deadline_ms is None


def test_default_max_tokens_is_configurable_and_explicit_value_wins() -> None:
    assert parse({"prompt": "x"}, default_max_tokens=7).sampling.max_tokens == 7
    assert parse({"prompt": "x", "max_tokens": 3}, default_max_tokens=7).sampling.max_tokens == 3


def test_every_field_is_read() -> None:
    req = parse(
        {
            "id": "req-1",
            "prompt": "Hi",
            "max_tokens": 5,
            "temperature": "0.5",
            "top_p": "0.9",
            "top_k": 40,
            "seed": 1234,
            "stop": '["\\n", "END"]',
            "stream": "1",
            "priority": -3,
            "timeout_s": "2.5",
            "reply_to": "my:replies",
        }
    )
    assert req.id == "req-1"
    assert req.sampling == SamplingParams(
        max_tokens=5, temperature=0.5, top_p=0.9, top_k=40, seed=1234, stop=("\n", "END")
    )
    assert (req.stream, req.priority, req.timeout_s, req.reply_to) == (True, -3, 2.5, "my:replies")


def test_str_keyed_fields_are_accepted_too() -> None:
    req = parse_request(
        {"prompt": "x", "max_tokens": "4"}, entry_id=ENTRY, prefix=PREFIX, max_request_bytes=LIMIT
    )
    assert (req.prompt, req.sampling.max_tokens) == ("x", 4)


# --- id -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("value", ["a", "Z", "0", "req_1.2:3-4", "A" * 128, "1700000000000-0"])
def test_good_ids(value: str) -> None:
    req = parse({"id": value, "prompt": "x"})
    assert req.id == value
    assert req.reply_to == f"{PREFIX}:result:{value}"


@pytest.mark.parametrize("value", ["1700000000000-6", "1700000000001-0", "99999999999999-0"])
def test_an_id_shaped_like_a_later_entry_id_is_refused_and_answered_under_the_entry_id(value: str) -> None:
    """Such an id is a later request's sent without 'id' (its entry id): squatting it would hand that
    request this one's answer. Its own error goes to its entry id's stream, not the squatted one."""
    rejected({"id": value, "prompt": "x"}, "id")
    assert best_effort_reply_to(wire({"id": value, "prompt": "x"}), entry_id=ENTRY, prefix=PREFIX) == (
        ENTRY, f"{PREFIX}:result:{ENTRY}")


@pytest.mark.parametrize("value", ["", "A" * 129, "a b", "a/b", "a{b}", "é", "a\n", "\na", "a*", "req#1"])
def test_bad_ids(value: str) -> None:
    rejected({"id": value, "prompt": "x"}, "id")


# --- prompt / prompt_ids ----------------------------------------------------------------------------


def test_prompt_is_kept_verbatim_including_unicode_and_whitespace() -> None:
    text = "  héllo wörld 🌍\n\ttabs  "
    assert parse({"prompt": text}).prompt == text


def test_neither_prompt_nor_prompt_ids() -> None:
    message = rejected({"max_tokens": 3}, None)
    assert "'prompt'" in message and "'prompt_ids'" in message


def test_both_prompt_and_prompt_ids() -> None:
    message = rejected({"prompt": "x", "prompt_ids": "[1]"}, None)
    assert "exactly one" in message


def test_empty_prompt() -> None:
    rejected({"prompt": ""}, "prompt")


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("[1, 2, 3]", (1, 2, 3)),
        (" [0] ", (0,)),
        (f"[{(1 << 64) - 1}]", ((1 << 64) - 1,)),
    ],
)
def test_good_prompt_ids(value: str, expected: tuple[int, ...]) -> None:
    req = parse({"prompt_ids": value})
    assert req.prompt_ids == expected
    assert req.prompt is None


@pytest.mark.parametrize(
    "value",
    [
        "1, 2",  # not JSON
        "[1, 2",  # not JSON
        "",  # not JSON
        "5",  # not an array
        '{"a": 1}',  # not an array
        '"[1]"',  # a string, not an array
        "[]",  # empty
        "[1.5]",
        "[1.0]",
        '["1"]',
        "[null]",
        "[[1]]",
        "[true]",  # bool is not an int
        "[1, false]",
        "[-1]",
        f"[{1 << 64}]",
    ],
)
def test_bad_prompt_ids(value: str) -> None:
    rejected({"prompt_ids": value}, "prompt_ids")


# --- sampling ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "expected"), [("1", 1), ("16", 16), (" 7 ", 7), ("+3", 3), (str(1 << 31), 1 << 31)]
)
def test_good_max_tokens(value: str, expected: int) -> None:
    assert parse({"prompt": "x", "max_tokens": value}).sampling.max_tokens == expected


@pytest.mark.parametrize(
    "value", ["0", "-1", "", "abc", "1.5", "2.0", "1e3", "0x10", "1 2", str((1 << 31) + 1)]
)
def test_bad_max_tokens(value: str) -> None:
    rejected({"prompt": "x", "max_tokens": value}, "max_tokens")


@pytest.mark.parametrize(
    ("value", "expected"), [("0", 0.0), ("0.0", 0.0), ("0.7", 0.7), ("2", 2.0), ("1e-3", 1e-3)]
)
def test_good_temperature(value: str, expected: float) -> None:
    assert parse({"prompt": "x", "temperature": value}).sampling.temperature == expected


@pytest.mark.parametrize("value", ["-0.1", "-1", "nan", "NaN", "inf", "-inf", "Infinity", "1e309", "hot", ""])
def test_bad_temperature(value: str) -> None:
    rejected({"prompt": "x", "temperature": value}, "temperature")


@pytest.mark.parametrize(("value", "expected"), [("1", 1.0), ("1.0", 1.0), ("0.5", 0.5), ("1e-9", 1e-9)])
def test_good_top_p(value: str, expected: float) -> None:
    assert parse({"prompt": "x", "top_p": value}).sampling.top_p == expected


@pytest.mark.parametrize("value", ["0", "0.0", "-0.5", "1.0001", "2", "nan", "inf", "x"])
def test_bad_top_p(value: str) -> None:
    rejected({"prompt": "x", "top_p": value}, "top_p")


@pytest.mark.parametrize(("value", "expected"), [("0", 0), ("1", 1), ("50", 50)])
def test_good_top_k(value: str, expected: int) -> None:
    assert parse({"prompt": "x", "top_k": value}).sampling.top_k == expected


@pytest.mark.parametrize("value", ["-1", "1.5", "k", ""])
def test_bad_top_k(value: str) -> None:
    rejected({"prompt": "x", "top_k": value}, "top_k")


@pytest.mark.parametrize(
    ("value", "expected"), [("0", 0), ("42", 42), ("-7", -7), (str((1 << 64) - 1), (1 << 64) - 1)]
)
def test_good_seed(value: str, expected: int) -> None:
    assert parse({"prompt": "x", "seed": value}).sampling.seed == expected


@pytest.mark.parametrize("value", ["1.5", "abc", "", str(1 << 64), str(-(1 << 63) - 1)])
def test_bad_seed(value: str) -> None:
    rejected({"prompt": "x", "seed": value}, "seed")


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("[]", ()),
        ('["\\n\\n"]', ("\n\n",)),
        ('["END", "stop here", "é"]', ("END", "stop here", "é")),
        (
            json.dumps([f"s{i}" for i in range(MAX_STOP_STRINGS)]),
            tuple(f"s{i}" for i in range(MAX_STOP_STRINGS)),
        ),
    ],
)
def test_good_stop(value: str, expected: tuple[str, ...]) -> None:
    assert parse({"prompt": "x", "stop": value}).sampling.stop == expected


@pytest.mark.parametrize(
    "value",
    [
        "END",  # not JSON
        '"END"',  # not an array
        '{"a": "b"}',
        '[""]',  # empty stop string
        '["a", ""]',
        "[1]",
        "[null]",
        '[["a"]]',
        json.dumps([f"s{i}" for i in range(MAX_STOP_STRINGS + 1)]),  # too many
    ],
)
def test_bad_stop(value: str) -> None:
    rejected({"prompt": "x", "stop": value}, "stop")


# --- stream, priority, timeout_s ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "expected"),
    [("0", False), ("1", True), ("true", True), ("false", False), ("TRUE", True), ("False", False)],
)
def test_good_stream(value: str, expected: bool) -> None:
    assert parse({"prompt": "x", "stream": value}).stream is expected


@pytest.mark.parametrize("value", ["2", "-1", "yes", "no", "", "t", "on"])
def test_bad_stream(value: str) -> None:
    rejected({"prompt": "x", "stream": value}, "stream")


@pytest.mark.parametrize(
    ("value", "expected"), [("0", 0), ("-5", -5), ("10", 10), (str((1 << 63) - 1), (1 << 63) - 1)]
)
def test_good_priority(value: str, expected: int) -> None:
    assert parse({"prompt": "x", "priority": value}).priority == expected


@pytest.mark.parametrize("value", ["high", "1.0", "", str(1 << 63)])
def test_bad_priority(value: str) -> None:
    rejected({"prompt": "x", "priority": value}, "priority")


def test_timeout_sets_deadline_from_the_entry_id() -> None:
    req = parse({"prompt": "x", "timeout_s": "2.5"})
    assert req.timeout_s == 2.5
    assert req.enqueued_ms == ENTRY_MS
    assert req.deadline_ms == ENTRY_MS + 2500.0


@pytest.mark.parametrize("value", ["0", "-1", "nan", "inf", "soon", ""])
def test_bad_timeout(value: str) -> None:
    rejected({"prompt": "x", "timeout_s": value}, "timeout_s")


def test_enqueued_ms_comes_from_the_entry_id() -> None:
    for entry in ("0-0", "5-1", "1700000000123-42"):
        req = parse_request(wire({"prompt": "x"}), entry_id=entry, prefix=PREFIX, max_request_bytes=LIMIT)
        assert req.enqueued_ms == int(entry.split("-")[0])
    assert entry_ms(b"1700000000123-9") == 1700000000123


# --- reply_to -------------------------------------------------------------------------------------------


def test_reply_to_defaults_to_the_result_stream_of_the_id() -> None:
    assert parse({"id": "abc", "prompt": "x"}).reply_to == f"{PREFIX}:result:abc"


@pytest.mark.parametrize(
    "value",
    [
        "my:replies",
        "{tag}:replies",
        "ryz:client:1234",
        "other:requests",
        "x" * MAX_KEY_BYTES,
        "é" * (MAX_KEY_BYTES // 2),
    ],
)
def test_good_reply_to(value: str) -> None:
    assert parse({"prompt": "x", "reply_to": value}).reply_to == value


@pytest.mark.parametrize(
    "value",
    ["", "x" * (MAX_KEY_BYTES + 1), "é" * (MAX_KEY_BYTES // 2 + 1), f"{PREFIX}:requests", f"{PREFIX}:cancel"],
)
def test_bad_reply_to(value: str) -> None:
    rejected({"prompt": "x", "reply_to": value}, "reply_to")


def test_reply_to_check_uses_the_configured_prefix() -> None:
    req = parse_request(
        wire({"prompt": "x", "reply_to": "ryz:requests"}),
        entry_id=ENTRY,
        prefix="other",
        max_request_bytes=LIMIT,
    )
    assert req.reply_to == "ryz:requests"
    with pytest.raises(InvalidRequest, match="'reply_to'"):
        parse_request(
            wire({"prompt": "x", "reply_to": "other:requests"}),
            entry_id=ENTRY,
            prefix="other",
            max_request_bytes=LIMIT,
        )


# --- bytes, unknown fields, size ----------------------------------------------------------------------


TEXT_FIELDS = [
    "id",
    "prompt",
    "prompt_ids",
    "max_tokens",
    "temperature",
    "top_p",
    "top_k",
    "seed",
    "stop",
    "stream",
    "priority",
    "timeout_s",
    "reply_to",
]


@pytest.mark.parametrize("field", TEXT_FIELDS)
@pytest.mark.parametrize(
    "bad", [b"\xff", b"ok\xc3(", b"\xed\xa0\x80"]
)  # invalid byte, bad continuation, surrogate
def test_invalid_utf8_names_the_field(field: str, bad: bytes) -> None:
    fields = {"prompt": "x"} if field not in ("prompt", "prompt_ids") else {}
    fields[field] = bad
    message = rejected(fields, field)
    assert "UTF-8" in message


def test_unknown_fields_are_ignored_also_with_unreadable_names() -> None:
    fields = wire({"prompt": "x", "colour": "blue", "max_tokens": 2})
    fields[b"\xff\xfe"] = b"\x00\xff"
    fields[b"extra"] = b"\xff"
    req = parse_request(fields, entry_id=ENTRY, prefix=PREFIX, max_request_bytes=LIMIT)
    assert (req.prompt, req.sampling.max_tokens) == ("x", 2)


def test_size_limit_counts_names_and_values() -> None:
    fields = {"prompt": "p" * 94}  # 6 + 94 = 100 bytes
    assert parse(fields, max_request_bytes=100).prompt == "p" * 94
    message = rejected(fields, None, max_request_bytes=99)
    assert "100 bytes" in message and "99" in message


def test_size_limit_applies_to_payload_and_unknown_fields() -> None:
    fields = wire({"prompt": "x", "junk": "j" * 1000})
    with pytest.raises(InvalidRequest, match="over the limit"):
        parse_request(fields, entry_id=ENTRY, prefix=PREFIX, max_request_bytes=500)
    big = packed({"prompt": "p" * 1000})
    with pytest.raises(InvalidRequest, match="over the limit"):
        parse_request(big, entry_id=ENTRY, prefix=PREFIX, max_request_bytes=500)


# --- msgpack payload ---------------------------------------------------------------------------------


FULL_PAYLOAD: dict[str, Any] = {
    "id": "mp-1",
    "prompt": "Hi",
    "max_tokens": 5,
    "temperature": 0,
    "top_p": 0.5,
    "top_k": 3,
    "seed": -9,
    "stop": ["a", "bc"],
    "stream": True,
    "priority": 2,
    "timeout_s": 1.5,
    "reply_to": "x:y",
}


@pytest.mark.parametrize("use_bin_type", [True, False])
def test_payload_with_native_types(use_bin_type: bool) -> None:
    req = parse_payload(FULL_PAYLOAD, use_bin_type=use_bin_type)
    assert req.id == "mp-1"
    assert req.prompt == "Hi"
    assert req.sampling == SamplingParams(
        max_tokens=5, temperature=0.0, top_p=0.5, top_k=3, seed=-9, stop=("a", "bc")
    )
    assert (req.stream, req.priority, req.timeout_s, req.reply_to) == (True, 2, 1.5, "x:y")
    assert req.enqueued_ms == ENTRY_MS


def test_payload_binary_values_are_decoded_as_utf8() -> None:
    req = parse_payload({b"prompt": "héllo".encode(), b"stop": [b"\n"], b"id": b"bin-1"})
    assert (req.id, req.prompt, req.sampling.stop) == ("bin-1", "héllo", ("\n",))


def test_payload_prompt_ids_as_array_or_json_text() -> None:
    assert parse_payload({"prompt_ids": [1, 2, (1 << 64) - 1]}).prompt_ids == (1, 2, (1 << 64) - 1)
    assert parse_payload({"prompt_ids": "[4, 5]"}).prompt_ids == (4, 5)


def test_payload_flat_string_values_work_like_fields() -> None:
    req = parse_payload({"prompt": "x", "max_tokens": "3", "stream": "true", "temperature": "0.25"})
    assert (req.sampling.max_tokens, req.stream, req.sampling.temperature) == (3, True, 0.25)


def test_payload_replaces_flat_fields() -> None:
    fields = packed({"prompt": "from payload"})
    fields[b"prompt"] = b"flat"
    fields[b"max_tokens"] = b"0"  # would be invalid, but the payload is the whole request
    req = parse_request(fields, entry_id=ENTRY, prefix=PREFIX, max_request_bytes=LIMIT)
    assert req.prompt == "from payload"
    assert req.sampling.max_tokens == 16


def test_payload_unknown_and_non_text_keys_are_ignored() -> None:
    req = parse_payload({"prompt": "x", 7: "seven", b"\xff": 1, "other": [1, 2]})
    assert req.prompt == "x"


@pytest.mark.parametrize(
    ("payload", "field"),
    [
        ({"prompt_ids": [1, True]}, "prompt_ids"),
        ({"prompt_ids": [1, 2.0]}, "prompt_ids"),
        ({"prompt_ids": []}, "prompt_ids"),
        ({"prompt_ids": [-1]}, "prompt_ids"),
        ({"prompt_ids": 5}, "prompt_ids"),
        ({"prompt": 5}, "prompt"),
        ({"prompt": ["a"]}, "prompt"),
        ({"prompt": "x", "max_tokens": 2.0}, "max_tokens"),
        ({"prompt": "x", "max_tokens": True}, "max_tokens"),
        ({"prompt": "x", "max_tokens": 0}, "max_tokens"),
        ({"prompt": "x", "temperature": True}, "temperature"),
        ({"prompt": "x", "temperature": math.nan}, "temperature"),
        ({"prompt": "x", "temperature": math.inf}, "temperature"),
        ({"prompt": "x", "top_p": 0}, "top_p"),
        ({"prompt": "x", "top_k": -1}, "top_k"),
        ({"prompt": "x", "seed": 1.5}, "seed"),
        ({"prompt": "x", "stop": ["a", ""]}, "stop"),
        ({"prompt": "x", "stop": ["a", 1]}, "stop"),
        ({"prompt": "x", "stop": "a"}, "stop"),
        ({"prompt": "x", "stop": [b"\xff"]}, "stop"),
        ({"prompt": "x", "stream": 2}, "stream"),
        ({"prompt": "x", "stream": 1.0}, "stream"),
        ({"prompt": "x", "priority": 0.5}, "priority"),
        ({"prompt": "x", "timeout_s": 0}, "timeout_s"),
        ({"prompt": "x", "timeout_s": -1.0}, "timeout_s"),
        ({"prompt": "x", "reply_to": 3}, "reply_to"),
        ({"prompt": "x", "reply_to": "ryz:requests"}, "reply_to"),
        ({"prompt": "x", "id": 12}, "id"),
        ({"prompt": "x", "id": "a b"}, "id"),
        ({"prompt": b"\xff"}, "prompt"),
    ],
)
def test_bad_payload_values(payload: dict[Any, Any], field: str) -> None:
    payload_rejected(payload, field)


def test_payload_stream_accepts_ints_and_bools() -> None:
    assert parse_payload({"prompt": "x", "stream": 1}).stream is True
    assert parse_payload({"prompt": "x", "stream": 0}).stream is False
    assert parse_payload({"prompt": "x", "stream": False}).stream is False


@pytest.mark.parametrize("data", [b"\xc1", b"\x81", b"\x92\x01", b"", b"\x81\xa1a"])
def test_malformed_msgpack(data: bytes) -> None:
    with pytest.raises(InvalidRequest, match="'payload'"):
        parse_request({b"payload": data}, entry_id=ENTRY, prefix=PREFIX, max_request_bytes=LIMIT)


@pytest.mark.parametrize("obj", [[1, 2], "text", 5, None, True])
def test_payload_must_be_a_map(obj: Any) -> None:
    message = payload_rejected(obj, "payload")
    assert "map" in message


def test_trailing_bytes_after_payload_are_rejected() -> None:
    data = msgpack.packb({"prompt": "x"}) + b"\x00"
    with pytest.raises(InvalidRequest, match="'payload'"):
        parse_request({b"payload": data}, entry_id=ENTRY, prefix=PREFIX, max_request_bytes=LIMIT)


# --- GenerationRequest ------------------------------------------------------------------------------


def _full_request() -> GenerationRequest:
    return parse(
        {
            "id": "round-trip",
            "prompt_ids": "[5, 6, 7]",
            "max_tokens": 9,
            "temperature": 0,
            "top_p": "0.25",
            "top_k": 2,
            "seed": (1 << 64) - 1,
            "stop": '["x", "yz"]',
            "stream": 1,
            "priority": -(1 << 63),
            "timeout_s": "0.001",
            "reply_to": "{t}:r",
        }
    )


@pytest.mark.parametrize("make", [_full_request, lambda: parse({"prompt": "just text"})])
def test_wire_round_trip(make: Any) -> None:
    req = make()
    back = GenerationRequest.from_wire(req.to_wire())
    assert back == req
    assert isinstance(back.to_wire(), bytes)
    assert back.to_wire() == req.to_wire()


def test_deadline_ms() -> None:
    req = GenerationRequest(id="a", prompt="x", reply_to="r", enqueued_ms=1000, timeout_s=0.25)
    assert req.deadline_ms == 1250.0
    assert GenerationRequest(id="a", prompt="x", reply_to="r", enqueued_ms=1000).deadline_ms is None


@pytest.mark.parametrize("bad_id", ["", "a b", "bad id!", "x" * 129, "a/b", "a\n", "\na"])
def test_generation_request_validates_its_id_itself(bad_id: str) -> None:
    with pytest.raises(ValidationError):
        GenerationRequest(id=bad_id, prompt="x", reply_to="r")


def test_requests_are_immutable() -> None:
    req = parse({"prompt": "x"})
    with pytest.raises(ValidationError):
        req.prompt = "y"  # type: ignore[misc]


SIGNING_KEY = b"k" * 64


def test_to_ingress_round_trips_through_parse_and_keeps_the_original_enqueue_time() -> None:
    req = _full_request()
    fields = req.to_ingress(from_owner="g-1", epoch=3, signing_key=SIGNING_KEY)
    later = "1800000000000-0"
    back = parse_request(fields, entry_id=later, prefix=PREFIX, max_request_bytes=LIMIT, signing_key=SIGNING_KEY)
    assert back.takeover_from == "g-1"
    assert back.takeover_epoch == 3
    assert back.enqueued_ms == req.enqueued_ms
    assert back.deadline_ms == req.deadline_ms
    assert back.model_copy(update={"takeover_from": None, "takeover_epoch": 0}) == req


def test_a_fresh_request_is_not_a_takeover() -> None:
    req = parse({"prompt": "x"})
    assert (req.takeover_from, req.takeover_epoch) == (None, 0)


def _forged(**internal: Any) -> dict[str, Any]:
    return {"id": "victim", "prompt": "x", "reply_to": "app:victim", **internal}


FORGERIES = [
    {"_takeover": ["g-1", 1]},  # claims the victim's epoch: would take its request over
    {"_enqueued_ms": 1},  # backdated: would jump the queue (and end its own timeout)
    {"_weights": "abc"},
    {"_anything": "1"},  # the whole kind: every name starting with '_'
]


@pytest.mark.parametrize("internal", FORGERIES)
def test_internal_fields_from_a_client_are_refused(internal: dict[str, Any]) -> None:
    """A client's entry never claims what only the pipeline may (a takeover, an earlier arrival):
    as flat fields, in an unsigned payload, signed under another key, or with the payload changed."""
    payload = msgpack.packb(_forged(**internal), use_bin_type=True)
    name = next(iter(internal))
    flat = {k: (v if isinstance(v, str) else json.dumps(v)) for k, v in _forged(**internal).items()}
    for fields in (flat, {"payload": payload}, {"payload": payload, "_sig": sign(b"guess", payload)},
                   {"payload": msgpack.packb({**_forged(**internal), "prompt": "mine"}),  # changed after signing
                    "_sig": sign(SIGNING_KEY, payload)},
                   {"payload": payload, "_sig": "00" * 32}):
        with pytest.raises(InvalidRequest, match=f"field '{name}': names starting with '_' are internal"):
            parse_request(wire(fields), entry_id=ENTRY, prefix=PREFIX, max_request_bytes=LIMIT,
                          signing_key=SIGNING_KEY)
    # without the pipeline's key (a parser that has none) nothing is signed either
    with pytest.raises(InvalidRequest, match="internal"):
        parse_request({"payload": payload, "_sig": sign(SIGNING_KEY, payload)}, entry_id=ENTRY, prefix=PREFIX,
                      max_request_bytes=LIMIT)
    # signed by the pipeline, the same fields count
    moved = parse_request({"payload": payload, "_sig": sign(SIGNING_KEY, payload)}, entry_id=ENTRY, prefix=PREFIX,
                          max_request_bytes=LIMIT, signing_key=SIGNING_KEY)
    assert moved.id == "victim"


def test_a_signature_alone_is_refused_like_any_internal_field() -> None:
    with pytest.raises(InvalidRequest, match="field '_sig'"):
        parse_request(wire({"prompt": "x", "_sig": "00"}), entry_id=ENTRY, prefix=PREFIX, max_request_bytes=LIMIT,
                      signing_key=SIGNING_KEY)


def test_an_id_shaped_like_a_later_entry_id_passes_only_in_a_signed_entry() -> None:
    """The squatting rule (a later request's entry id) is waived for the pipeline's moves alone."""
    later = "1800000000000-0"
    forged = {"payload": msgpack.packb({"id": later, "prompt": "x", "_takeover": ["g", 1]}, use_bin_type=True)}
    with pytest.raises(InvalidRequest):
        parse_request(forged, entry_id=ENTRY, prefix=PREFIX, max_request_bytes=LIMIT, signing_key=SIGNING_KEY)
    assert best_effort_reply_to(forged, entry_id=ENTRY, prefix=PREFIX, signing_key=SIGNING_KEY)[0] == ENTRY
    signed = {**forged, "_sig": sign(SIGNING_KEY, forged["payload"])}
    assert parse_request(signed, entry_id=ENTRY, prefix=PREFIX, max_request_bytes=LIMIT,
                         signing_key=SIGNING_KEY).id == later
    assert best_effort_reply_to(signed, entry_id=ENTRY, prefix=PREFIX, signing_key=SIGNING_KEY)[0] == later


# --- best_effort_reply_to -------------------------------------------------------------------------------


def test_best_effort_uses_the_sent_id_and_reply_to() -> None:
    assert best_effort_reply_to(wire({"id": "abc", "max_tokens": "x"}), entry_id=ENTRY, prefix=PREFIX) == (
        "abc",
        f"{PREFIX}:result:abc",
    )
    assert best_effort_reply_to(wire({"id": "abc", "reply_to": "mine"}), entry_id=ENTRY, prefix=PREFIX) == (
        "abc",
        "mine",
    )


def test_best_effort_keeps_an_id_that_fails_the_pattern() -> None:
    # The client waits under the id it sent; an error must reach it there.
    assert best_effort_reply_to(wire({"id": "a b"}), entry_id=ENTRY, prefix=PREFIX) == (
        "a b",
        f"{PREFIX}:result:a b",
    )


@pytest.mark.parametrize(
    "fields",
    [
        {},
        {b"id": b""},
        {b"id": b"x" * (MAX_KEY_BYTES + 1)},
        {b"payload": b"\xc1"},
        {b"payload": msgpack.packb([1])},
        # not UTF-8: decoded with replacement characters, b"\xff" and b"\xfe" met under one key
        {b"id": b"\xff"},
        {b"id": b"\xfe"},
        {b"payload": msgpack.packb({"id": b"\xff", "prompt": "hi"}, use_bin_type=True)},
    ],
)
def test_best_effort_falls_back_to_the_entry_id(fields: dict[bytes, bytes]) -> None:
    assert best_effort_reply_to(fields, entry_id=ENTRY, prefix=PREFIX) == (ENTRY, f"{PREFIX}:result:{ENTRY}")


@pytest.mark.parametrize(
    "reply_to", [b"", f"{PREFIX}:requests".encode(), f"{PREFIX}:cancel".encode(), b"x" * (MAX_KEY_BYTES + 1),
                 b"\xfe\x00", b"\xff\x00"]
)
def test_best_effort_never_replies_to_an_unusable_key(reply_to: bytes) -> None:
    assert best_effort_reply_to({b"id": b"abc", b"reply_to": reply_to}, entry_id=ENTRY, prefix=PREFIX) == (
        "abc",
        f"{PREFIX}:result:abc",
    )


def test_best_effort_reads_the_payload() -> None:
    fields = packed({"id": "p-9", "reply_to": "back:here", "prompt": 5})
    assert best_effort_reply_to(fields, entry_id=ENTRY, prefix=PREFIX) == ("p-9", "back:here")


# --- limit_problem ---------------------------------------------------------------------------------------


def test_limit_problem_accepts_what_fits() -> None:
    assert limit_problem([0, 5, 99], 7, vocab_size=100, max_context=10) is None
    assert limit_problem((1,), 1, vocab_size=2, max_context=2) is None


def test_limit_problem_token_outside_the_vocabulary() -> None:
    problem = limit_problem([1, 100], 1, vocab_size=100, max_context=1000)
    assert problem is not None and "100" in problem and "vocabulary" in problem


def test_limit_problem_context_length() -> None:
    problem = limit_problem([1, 2, 3], 8, vocab_size=100, max_context=10)
    assert problem is not None and "11" in problem and "10" in problem


def test_limit_problem_empty_prompt() -> None:
    assert limit_problem([], 1, vocab_size=100, max_context=10) is not None


# --- result events ------------------------------------------------------------------------------------


def _flat(fields: dict[Any, Any]) -> None:
    assert all(isinstance(k, str) and isinstance(v, str) for k, v in fields.items()), fields


def test_token_event() -> None:
    ev = token_event("r1", 3, 1234, " wor")
    _flat(ev)
    assert ev == {"id": "r1", "event": "token", "index": "3", "token_id": "1234", "text": " wor"}


def test_done_event() -> None:
    ev = done_event("r1", text="Hello world", token_ids=[1, 2, 3], finish_reason="length", prompt_tokens=7)
    _flat(ev)
    assert ev["id"] == "r1" and ev["event"] == "done"
    assert ev["text"] == "Hello world"
    assert json.loads(ev["token_ids"]) == [1, 2, 3]
    assert (ev["finish_reason"], ev["prompt_tokens"], ev["completion_tokens"]) == ("length", "7", "3")


def test_done_event_with_no_tokens() -> None:
    ev = done_event("r1", text="", token_ids=[], finish_reason="cancelled", prompt_tokens=0)
    _flat(ev)
    assert (json.loads(ev["token_ids"]), ev["completion_tokens"], ev["text"]) == ([], "0", "")


def test_error_event() -> None:
    ev = error_event("r1", "invalid_request", "field 'x': bad")
    _flat(ev)
    assert ev == {"id": "r1", "event": "error", "code": "invalid_request", "message": "field 'x': bad"}


def test_final_events() -> None:
    assert sorted(FINAL_EVENTS) == ["done", "error"]
    assert token_event("r", 0, 0, "")["event"] not in FINAL_EVENTS


@pytest.mark.parametrize("key", ["PFX:requests", "PFX:cancel", "PFX:groups", "{PFX:groups}:info:g1",
                                 "{PFX:g:g1}:queue", "{PFX:g:g1}:accepting"])
def test_reply_to_must_not_name_an_internal_key(key: str) -> None:
    reply_to = key.replace("PFX", "ryz")
    with pytest.raises(InvalidRequest, match="reply_to"):
        parse_request({b"prompt": b"hi", b"reply_to": reply_to.encode()}, entry_id="1-0", prefix="ryz",
                      max_request_bytes=1 << 20)


def test_reply_to_may_be_any_other_key_under_the_prefix() -> None:
    request = parse_request({b"prompt": b"hi", b"reply_to": b"ryz:my-replies"}, entry_id="1-0", prefix="ryz",
                            max_request_bytes=1 << 20)
    assert request.reply_to == "ryz:my-replies"


def _pipeline_keys() -> list[str]:
    """One key of every kind the pipeline owns (broker.keys), under PREFIX."""
    k = Keys(PREFIX)
    return [
        k.requests, k.cancel, k.groups, k.group_info("g"), k.group_queue("g"), k.group_queue_tokens("g"),
        k.group_accepting("g"), k.group_failover_lock("g"), k.dispatch_marker("g", "abc", 1), k.balancers,
        k.balancer_stats("b"), k.dead, k.request_id("abc"), k.request_id("other"), k.chat_template("0" * 64), k.signing_key,
        *k.progress(k.result("abc"), "abc"), *k.progress(k.result("victim"), "victim"),
        *k.progress("app:replies", "victim"), *k.progress("{app}:replies", "victim"),
        *k.progress("replies}1", "victim"), *k.progress(k.client_replies("c1"), "victim"),
        k.result("victim"), k.result("abc-not"), "rq:queue:" + k.batch_queue, "rq:job:1",
        # a hash tag alone shares the state keys of the key inside it (companion("{K}") == companion("K"))
        "{" + k.result("victim") + "}", "{" + k.result("abc") + "}", "{app:replies}",
    ]


@pytest.mark.parametrize("key", _pipeline_keys())
def test_reply_to_is_never_a_pipeline_key_nor_another_requests_result(key: str) -> None:
    """Every key kind the pipeline writes, including per-request state of any reply stream, and the
    default result stream of any other id: refused before dispatch, and never the best-effort target."""
    rejected({"id": "abc", "prompt": "x", "reply_to": key}, "reply_to")
    assert best_effort_reply_to(wire({"id": "abc", "max_tokens": "x", "reply_to": key}),
                                entry_id=ENTRY, prefix=PREFIX) == ("abc", f"{PREFIX}:result:abc")


@pytest.mark.parametrize("key", [f"{PREFIX}:result:abc", f"{PREFIX}:client:1234", f"{PREFIX}:batch:j1:replies",
                                 "app:replies", "{app}:replies", "my:state", "{app}:stately"])
def test_reply_to_of_a_client_chosen_stream_still_works(key: str) -> None:
    assert parse({"id": "abc", "prompt": "x", "reply_to": key}).reply_to == key
