"""The structured-output fields of a request (PROTOCOL.md, "Structured output"): flat fields as
redis-cli sends them, the msgpack form, shapes refused by name, and round trips through the group
queue and re-enqueueing (a request that moves keeps its constraint, under the field it was sent as)."""

from __future__ import annotations

from typing import Any

import pytest

from broker.protocol import GenerationRequest
from broker.structured import MAX_CHOICES, StructuredOutput
from broker.validation import parse_request
from tests.broker.test_protocol import ENTRY, PREFIX, parse, parse_payload, rejected

BASE = {"prompt": "hi"}
SCHEMA = '{"type": "object", "properties": {"a": {"type": "integer"}}}'


@pytest.mark.parametrize(("fields", "expected"), [
    ({"guided_json": SCHEMA}, ("json", '{"type":"object","properties":{"a":{"type":"integer"}}}', "guided_json")),
    ({"guided_regex": "[0-9]{3}"}, ("regex", "[0-9]{3}", "guided_regex")),
    ({"guided_choice": '["yes", "no"]'}, ("choice", '["yes", "no"]', "guided_choice")),
    ({"guided_grammar": 'root ::= "a" | "b"'}, ("grammar", 'root ::= "a" | "b"', "guided_grammar")),
    ({"response_format": '{"type": "json_object"}'}, ("json_object", "", "response_format")),
    ({"response_format": '{"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "integer"}}}'},
     ("json", '{"type":"integer"}', "response_format")),
    ({"response_format": '{"type": "json_schema", "json_schema": {"name": "x"}}'}, ("json", "{}", "response_format")),
    ({"structured_outputs": '{"choice": ["a"]}'}, ("choice", '["a"]', "structured_outputs")),
    ({"structured_outputs": '{"json_object": true}'}, ("json_object", "", "structured_outputs")),
])
def test_flat_fields_as_redis_cli_sends_them(fields: dict[str, str], expected: tuple[str, str, str]) -> None:
    structured = parse({**BASE, **fields}).sampling.structured
    assert structured is not None
    assert (structured.kind, structured.spec, structured.field) == expected


def test_unset_and_neutral_values_constrain_nothing() -> None:
    assert parse(BASE).sampling.structured is None
    for fields in ({"response_format": "text"}, {"response_format": '{"type": "text"}'}, {"guided_json": "null"}):
        assert parse({**BASE, **fields}).sampling.structured is None


def test_the_msgpack_form_takes_native_maps_and_arrays() -> None:
    s = parse_payload({**BASE, "guided_json": {"type": "string", "maxLength": 3}}).sampling.structured
    assert s == StructuredOutput(kind="json", spec='{"type":"string","maxLength":3}', field="guided_json")
    s = parse_payload({**BASE, "guided_choice": [b"a", "b"]}).sampling.structured
    assert s is not None and s.spec == '["a", "b"]'
    s = parse_payload({**BASE, "response_format": {"type": "json_object"}}).sampling.structured
    assert s is not None and s.kind == "json_object"


@pytest.mark.parametrize(("fields", "field", "words"), [
    ({"guided_json": "[1, 2]"}, "guided_json", "JSON schema"),
    ({"guided_json": "{not json"}, "guided_json", "JSON schema"),
    ({"guided_regex": "  "}, "guided_regex", "empty"),
    ({"guided_choice": "[]"}, "guided_choice", "non-empty"),
    ({"guided_choice": '["a", 1]'}, "guided_choice", "string"),
    ({"guided_choice": '["a", ""]'}, "guided_choice", "non-empty string"),
    ({"guided_grammar": ""}, "guided_grammar", "empty"),
    ({"response_format": '{"type": "yaml"}'}, "response_format", "'yaml' is not supported"),
    ({"response_format": "json"}, "response_format", "'type'"),
    ({"response_format": '{"type": "json_schema"}'}, "response_format", "json_schema"),
    ({"structured_outputs": '{"json": {}, "regex": "a"}'}, "structured_outputs", "exactly one"),
    ({"structured_outputs": '{"structural_tag": "x"}'}, "structured_outputs", "'structural_tag'"),
    ({"guided_json": SCHEMA, "guided_choice": '["a"]'}, "guided_json", "at most one"),
    ({"guided_regex": "a", "response_format": '{"type": "json_object"}'}, "guided_regex", "at most one"),
    ({"guided_whitespace_pattern": " *"}, "guided_whitespace_pattern", "not supported"),
])
def test_bad_shapes_are_refused_naming_the_field(fields: dict[str, str], field: str, words: str) -> None:
    assert words in rejected({**BASE, **fields}, field)


def test_choice_count_is_bounded() -> None:
    rejected({**BASE, "guided_choice": str([f"c{i}" for i in range(MAX_CHOICES + 1)]).replace("'", '"')},
             "guided_choice")


@pytest.mark.parametrize("fields", [
    {"guided_json": SCHEMA}, {"guided_regex": "a+"}, {"guided_choice": '["x", "y\\"z"]'},
    {"guided_grammar": 'root ::= "a"'}, {"response_format": '{"type": "json_object"}'},
    {"response_format": '{"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "integer"}}}'},
    {"structured_outputs": '{"regex": "a\\"b"}'}, {"structured_outputs": '{"json": {"type": "string"}}'},
])
def test_round_trips_through_the_group_queue_and_re_enqueueing(fields: dict[str, Any]) -> None:
    request = parse({**BASE, **fields})
    assert GenerationRequest.from_wire(request.to_wire()) == request
    again = parse_request(request.to_ingress(from_owner="g1", epoch=3, signing_key=b"k"), entry_id=ENTRY,
                          prefix=PREFIX, max_request_bytes=1 << 20, signing_key=b"k")
    assert again.sampling.structured == request.sampling.structured
