"""Property tests: no input makes ``parse_request`` or ``best_effort_reply_to`` raise anything unexpected,
and every valid request parses back to exactly what was sent."""

from __future__ import annotations

import json
from typing import Any

import msgpack
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from broker.errors import InvalidRequest
from broker.keys import Keys
from broker.protocol import ID_RE, INT64_MIN, MAX_KEY_BYTES, MAX_STOP_STRINGS, UINT64_MAX, GenerationRequest
from broker.validation import best_effort_reply_to, parse_request
from tests.broker.test_protocol import TEXT_FIELDS

PREFIX = "ryz"
ENTRY = "1700000000000-0"
# The contract's request fields, plus the payload form and the internal fields ryzanstein sets itself.
FIELD_NAMES = [*TEXT_FIELDS, "payload", "_takeover", "_enqueued_ms"]

fuzz = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])

utf8_text = st.text(alphabet=st.characters(codec="utf-8"), max_size=30)

# Values that sit near the edges of what each field accepts.
edge_values = st.sampled_from(
    [
        b"",
        b" ",
        b"0",
        b"1",
        b"-1",
        b"+1",
        b"1.0",
        b"1e3",
        b"nan",
        b"inf",
        b"-inf",
        b"1e309",
        b"true",
        b"false",
        b"TRUE",
        b"[]",
        b"[1]",
        b"[-1]",
        b"[true]",
        b"[1.5]",
        b'[""]',
        b'["a"]',
        b"[[1]]",
        b"{}",
        b"null",
        b"9" * 25,
        b"[" * 5000,
        b"1" * 5000,
        b"[" + b"9" * 5000 + b"]",
        str(UINT64_MAX + 1).encode(),
        b"ryz:requests",
        b"ryz:cancel",
        b"\xff",
        b"\xed\xa0\x80",
        b"\x00",
        "é".encode(),
    ]
)
flat_value = st.one_of(
    st.binary(max_size=40),
    utf8_text.map(str.encode),
    edge_values,
    st.integers().map(lambda n: str(n).encode()),
    st.floats().map(lambda f: repr(f).encode()),
    st.lists(st.integers(min_value=-5, max_value=UINT64_MAX + 5), max_size=5).map(
        lambda v: json.dumps(v).encode()
    ),
    st.lists(utf8_text, max_size=MAX_STOP_STRINGS + 2).map(lambda v: json.dumps(v).encode()),
)
field_name = st.one_of(st.sampled_from(FIELD_NAMES).map(str.encode), st.binary(max_size=12))

msgpack_scalar = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=INT64_MIN, max_value=UINT64_MAX),
    st.floats(),
    utf8_text,
    st.binary(max_size=20),
    edge_values,
)
msgpack_value = st.recursive(
    msgpack_scalar,
    lambda inner: (
        st.lists(inner, max_size=5)
        | st.dictionaries(
            st.one_of(st.sampled_from(FIELD_NAMES), utf8_text, st.binary(max_size=8)), inner, max_size=5
        )
    ),
    max_leaves=20,
)
payload_map = st.dictionaries(
    st.one_of(
        st.sampled_from(FIELD_NAMES),
        st.sampled_from(FIELD_NAMES).map(str.encode),
        utf8_text,
        st.integers(min_value=-5, max_value=5),
    ),
    msgpack_value,
    max_size=len(FIELD_NAMES),
)


def _packed(obj: Any, use_bin_type: bool) -> bytes:
    return msgpack.packb(obj, use_bin_type=use_bin_type)


payload_bytes = st.one_of(
    st.builds(_packed, payload_map, st.booleans()),
    st.builds(_packed, msgpack_value, st.booleans()),
    st.binary(max_size=60),
)


def check_parse(fields: dict[Any, Any], max_request_bytes: int = 1 << 20) -> None:
    """The contract of parse_request on any input: a valid request or InvalidRequest, nothing else."""
    try:
        req = parse_request(fields, entry_id=ENTRY, prefix=PREFIX, max_request_bytes=max_request_bytes)
    except InvalidRequest as exc:
        # Every rejection says what is wrong; the catch-all fallback means an unforeseen exception.
        message = str(exc)
        assert "could not be parsed" not in message, message
        assert "'" in message or "over the limit" in message, message
        return
    assert isinstance(req, GenerationRequest)
    assert ID_RE.fullmatch(req.id)
    assert (req.prompt is None) != (req.prompt_ids is None)
    assert req.prompt != ""
    assert req.reply_to and len(req.reply_to.encode()) <= MAX_KEY_BYTES
    assert req.reply_to not in (f"{PREFIX}:requests", f"{PREFIX}:cancel")
    # Whatever was accepted must survive the trip to a worker group.
    assert GenerationRequest.from_wire(req.to_wire()) == req


def check_best_effort(fields: dict[Any, Any]) -> None:
    request_id, reply_to = best_effort_reply_to(fields, entry_id=ENTRY, prefix=PREFIX)
    assert isinstance(request_id, str) and request_id
    assert isinstance(reply_to, str) and reply_to
    assert reply_to not in (f"{PREFIX}:requests", f"{PREFIX}:cancel")


@fuzz
@given(st.dictionaries(st.binary(max_size=20), st.binary(max_size=80), max_size=8))
def test_arbitrary_bytes_fields(fields: dict[bytes, bytes]) -> None:
    check_parse(fields)
    check_best_effort(fields)


@fuzz
@given(st.dictionaries(field_name, flat_value, max_size=10), st.integers(min_value=1, max_value=1 << 12))
def test_real_field_names_with_edge_values(fields: dict[bytes, bytes], max_request_bytes: int) -> None:
    check_parse(fields, max_request_bytes)
    check_best_effort(fields)


@fuzz
@given(st.dictionaries(field_name, flat_value, max_size=6).map(lambda d: {b"prompt": b"x", **d}))
def test_mostly_valid_entries(fields: dict[bytes, bytes]) -> None:
    check_parse(fields)
    check_best_effort(fields)


@fuzz
@given(payload_bytes, st.dictionaries(field_name, flat_value, max_size=3))
def test_arbitrary_msgpack_payloads(payload: bytes, extra: dict[bytes, bytes]) -> None:
    fields = {**extra, b"payload": payload}
    check_parse(fields)
    check_best_effort(fields)


@fuzz
@given(payload_map.map(lambda d: {"prompt": "x", **d}), st.booleans())
def test_mostly_valid_payloads(payload: dict[Any, Any], use_bin_type: bool) -> None:
    fields = {b"payload": _packed(payload, use_bin_type)}
    check_parse(fields)
    check_best_effort(fields)


# --- valid requests parse to exactly what was sent ------------------------------------------------------


request_ids = st.from_regex(r"[A-Za-z0-9_.:\-]{1,128}", fullmatch=True)
finite = {"allow_nan": False, "allow_infinity": False}


@st.composite
def valid_requests(draw: st.DrawFn) -> dict[str, Any]:
    """Native values of a valid request; absent keys take their defaults."""
    req: dict[str, Any] = {}
    if draw(st.booleans()):
        req["prompt"] = draw(st.text(alphabet=st.characters(codec="utf-8"), min_size=1, max_size=50))
    else:
        req["prompt_ids"] = draw(
            st.lists(st.integers(min_value=0, max_value=UINT64_MAX), min_size=1, max_size=20)
        )
    optional = {
        "id": request_ids,
        "max_tokens": st.integers(min_value=1, max_value=1 << 31),
        "temperature": st.floats(min_value=0.0, max_value=1e6, **finite),
        "top_p": st.floats(min_value=0.0, max_value=1.0, exclude_min=True),
        "top_k": st.integers(min_value=0, max_value=1 << 31),
        "seed": st.integers(min_value=INT64_MIN, max_value=UINT64_MAX),
        "stop": st.lists(
            st.text(alphabet=st.characters(codec="utf-8"), min_size=1, max_size=8), max_size=MAX_STOP_STRINGS
        ),
        "stream": st.booleans(),
        "priority": st.integers(min_value=INT64_MIN, max_value=(1 << 63) - 1),
        "timeout_s": st.floats(min_value=0.0, exclude_min=True, **finite),
        # valid reply_to names only (the rules of Keys.reply_to_problem: e.g. not "{0}", a hash tag alone)
        "reply_to": st.text(alphabet=st.characters(codec="utf-8"), min_size=1, max_size=40).filter(
            lambda s: Keys(PREFIX).reply_to_problem(s, "fuzz-id") is None
        ),
    }
    for name, strategy in optional.items():
        if draw(st.booleans()):
            req[name] = draw(strategy)
    return req


def _flat_fields(req: dict[str, Any]) -> dict[bytes, bytes]:
    out = {}
    for name, value in req.items():
        if isinstance(value, list):
            text = json.dumps(value)
        elif isinstance(value, bool):
            text = "1" if value else "0"
        elif isinstance(value, float):
            text = repr(value)
        else:
            text = str(value)
        out[name.encode()] = text.encode()
    return out


def _assert_matches(parsed: GenerationRequest, req: dict[str, Any]) -> None:
    request_id = req.get("id", ENTRY)
    assert parsed.id == request_id
    assert parsed.prompt == req.get("prompt")
    assert parsed.prompt_ids == (tuple(req["prompt_ids"]) if "prompt_ids" in req else None)
    s = parsed.sampling
    assert s.max_tokens == req.get("max_tokens", 16)
    assert s.temperature == req.get("temperature", 1.0)
    assert s.top_p == req.get("top_p", 1.0)
    assert s.top_k == req.get("top_k", 0)
    assert s.seed == req.get("seed")
    assert s.stop == tuple(req.get("stop", ()))
    assert parsed.stream is req.get("stream", False)
    assert parsed.priority == req.get("priority", 0)
    assert parsed.timeout_s == req.get("timeout_s")
    assert parsed.reply_to == req.get("reply_to", f"{PREFIX}:result:{request_id}")


@fuzz
@given(valid_requests())
def test_valid_flat_requests_parse_to_what_was_sent(req: dict[str, Any]) -> None:
    parsed = parse_request(_flat_fields(req), entry_id=ENTRY, prefix=PREFIX, max_request_bytes=1 << 20)
    _assert_matches(parsed, req)


@fuzz
@given(valid_requests(), st.booleans())
def test_valid_payload_requests_parse_to_what_was_sent(req: dict[str, Any], use_bin_type: bool) -> None:
    parsed = parse_request(
        {b"payload": _packed(req, use_bin_type)}, entry_id=ENTRY, prefix=PREFIX, max_request_bytes=1 << 20
    )
    _assert_matches(parsed, req)
