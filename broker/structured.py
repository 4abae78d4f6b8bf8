"""Structured output on the wire: the request fields that constrain a completion to a JSON schema,
a regular expression, a list of choices or a grammar, read into one ``StructuredOutput``.

The fields are vLLM's and OpenAI's (docs/PROTOCOL.md, "Structured output"): ``guided_json``,
``guided_regex``, ``guided_choice``, ``guided_grammar``, ``structured_outputs`` (vLLM's newer
object holding one of those) and ``response_format`` (``json_object`` / ``json_schema``). A request
sets at most one of them. Only their shapes are checked here, where every request passes (the
balancer must not load a grammar engine); whether the schema or grammar compiles is checked by the
worker group that compiles it against its model's vocabulary (gpu_workers.structured_output), which
ends the request with ``invalid_request`` naming the problem when it does not.
"""

from __future__ import annotations

import json
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from broker.errors import InvalidRequest

StructuredKind = Literal["json", "json_object", "regex", "choice", "grammar"]
MAX_CHOICES = 1024
MAX_SPEC_BYTES = 256 * 1024  # a schema, regex or grammar as text (the whole request is at most 1 MiB)
FIELDS = ("guided_json", "guided_regex", "guided_choice", "guided_grammar", "structured_outputs", "response_format")


class StructuredOutput(BaseModel):
    """What a completion must match.

    ``kind`` and ``spec``: ``json`` and a JSON schema (compact JSON text); ``json_object`` (any JSON
    object; ``spec`` empty); ``regex`` and the pattern; ``choice`` and a JSON array of the strings;
    ``grammar`` and an EBNF (GBNF, root rule ``root``) or Lark (start rule ``start``) grammar.
    ``field``: the request field it came from, for error messages.
    """

    model_config = ConfigDict(frozen=True, strict=True)

    kind: StructuredKind
    spec: str = Field(default="", max_length=MAX_SPEC_BYTES)
    field: str = "guided_json"

    def to_fields(self) -> dict[str, Any]:
        """The request field that reads back as this (``parse_structured``), for re-enqueueing: the
        field it came from, so that errors name the field the client sent."""
        if self.kind == "json_object":
            if self.field == "structured_outputs":
                return {"structured_outputs": '{"json_object":true}'}
            return {"response_format": '{"type":"json_object"}'}
        if self.field == "response_format" and self.kind == "json":
            return {"response_format": f'{{"type":"json_schema","json_schema":{{"name":"schema","schema":{self.spec}}}}}'}
        if self.field == "structured_outputs":
            value = self.spec if self.kind in ("json", "choice") else json.dumps(self.spec, ensure_ascii=False)
            return {"structured_outputs": f'{{"{self.kind}":{value}}}'}
        return {f"guided_{self.kind}": self.spec}


def parse_structured(raw: dict[str, Any]) -> StructuredOutput | None:
    """The structured-output constraint ``raw`` (field name -> value, flat text or msgpack values)
    sets, or None. Raises InvalidRequest naming the field: two such fields set, a value of the wrong
    shape, an unsupported ``response_format`` type."""
    found = [(name, raw[name]) for name in FIELDS if raw.get(name) is not None and not _neutral(name, raw[name])]
    if not found:
        return None
    if len(found) > 1:
        raise InvalidRequest(f"fields {found[0][0]!r} and {found[1][0]!r}: at most one structured-output "
                             "field may be set")
    name, value = found[0]
    if name == "response_format":
        return _response_format(value)
    if name == "structured_outputs":
        return _structured_outputs(value)
    return _guided(name, value)


def _neutral(name: str, value: Any) -> bool:
    """Values that constrain nothing: JSON ``null`` (as unset), ``response_format`` ``text`` (or
    ``{"type": "text"}``)."""
    if isinstance(value, (str, bytes)) and value.strip() in ("null", b"null"):
        return True
    if name != "response_format":
        return False
    obj = _object_or_text(name, value)
    return obj == "text" or (isinstance(obj, dict) and obj.get("type") == "text")


def _guided(name: str, value: Any) -> StructuredOutput:
    if name == "guided_json":
        return StructuredOutput(kind="json", spec=_schema_text(name, value), field=name)
    if name == "guided_choice":
        return StructuredOutput(kind="choice", spec=_choices(name, value), field=name)
    text = _text(name, value)
    if not text.strip():
        raise InvalidRequest(f"field {name!r}: must not be empty")
    _check_size(name, text)
    return StructuredOutput(kind="regex" if name == "guided_regex" else "grammar", spec=text, field=name)


def _response_format(value: Any) -> StructuredOutput:
    name = "response_format"
    obj = _object_or_text(name, value)
    if not isinstance(obj, dict):
        raise InvalidRequest(f"field {name!r}: expected a JSON object with a 'type', got {str(value)[:40]!r}")
    kind = obj.get("type")
    if kind == "json_object":
        return StructuredOutput(kind="json_object", field=name)
    if kind == "json_schema":
        spec = obj.get("json_schema")
        if not isinstance(spec, dict):
            raise InvalidRequest(f"field {name!r}: type json_schema needs a 'json_schema' object "
                                 "({\"name\": ..., \"schema\": {...}})")
        schema = spec.get("schema", {})  # OpenAI's schema is optional: any JSON value then
        return StructuredOutput(kind="json", spec=_schema_text(f"{name}.json_schema.schema", schema), field=name)
    raise InvalidRequest(f"field {name!r}: type {kind!r} is not supported (text, json_object or json_schema)")


def _structured_outputs(value: Any) -> StructuredOutput:
    """vLLM's ``structured_outputs``: an object with one of json, regex, choice, grammar, json_object."""
    name = "structured_outputs"
    obj = _object_or_text(name, value)
    if not isinstance(obj, dict):
        raise InvalidRequest(f"field {name!r}: expected a JSON object")
    keys = [k for k in ("json", "regex", "choice", "grammar", "json_object") if obj.get(k) not in (None, False)]
    other = sorted(k for k, v in obj.items() if v is not None and k not in ("json", "regex", "choice", "grammar",
                                                                              "json_object", "backend"))
    if other:
        raise InvalidRequest(f"field {name!r}: {other[0]!r} is not supported (json, regex, choice, grammar, "
                             "json_object)")
    if len(keys) != 1:
        raise InvalidRequest(f"field {name!r}: exactly one of json, regex, choice, grammar, json_object must be set")
    key = keys[0]
    if key == "json_object":
        return StructuredOutput(kind="json_object", field=name)
    built = _guided(f"guided_{key}", obj[key])
    return StructuredOutput(kind=built.kind, spec=built.spec, field=name)


def _schema_text(name: str, value: Any) -> str:
    """A JSON schema (an object, or JSON text of one) as compact JSON text."""
    schema = _object_or_text(name, value)
    if isinstance(schema, bool):  # true / false are schemas too; only true can be generated
        schema = {} if schema else None
    if not isinstance(schema, dict):
        raise InvalidRequest(f"field {name!r}: expected a JSON schema (a JSON object)")
    try:
        text = json.dumps(schema, separators=(",", ":"), ensure_ascii=False)
    except (TypeError, ValueError, RecursionError):
        raise InvalidRequest(f"field {name!r}: not a JSON schema") from None
    _check_size(name, text)
    return text


def _choices(name: str, value: Any) -> str:
    items = _object_or_text(name, value)
    if not isinstance(items, list) or not items:
        raise InvalidRequest(f"field {name!r}: expected a non-empty JSON array of strings")
    if len(items) > MAX_CHOICES:
        raise InvalidRequest(f"field {name!r}: at most {MAX_CHOICES} choices, got {len(items)}")
    out = []
    for item in items:
        if isinstance(item, bytes):
            item = _text(name, item)
        if not isinstance(item, str) or not item:
            raise InvalidRequest(f"field {name!r}: every choice must be a non-empty string, got {item!r:.40}")
        out.append(item)
    text = json.dumps(out, ensure_ascii=False)
    _check_size(name, text)
    return text


def _object_or_text(name: str, value: Any) -> Any:
    """A msgpack value as it is (maps and arrays with text keys and items); flat text parsed as JSON,
    or kept as text when it is not JSON."""
    if isinstance(value, (dict, list, bool)):
        return _decoded(value)
    text = _text(name, value)
    try:
        return json.loads(text)
    except (ValueError, RecursionError):
        return text.strip()


def _decoded(value: Any) -> Any:
    if isinstance(value, bytes):
        return value.decode("utf-8", "replace")
    if isinstance(value, dict):
        return {str(_decoded(k)): _decoded(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_decoded(v) for v in value]
    return value


def _text(name: str, value: Any) -> str:
    if isinstance(value, bytes):
        try:
            return value.decode("utf-8")
        except UnicodeDecodeError:
            raise InvalidRequest(f"field {name!r}: not valid UTF-8") from None
    if isinstance(value, str):
        return value
    raise InvalidRequest(f"field {name!r}: expected text, got {type(value).__name__}")


def _check_size(name: str, text: str) -> None:
    try:
        size = len(text.encode("utf-8"))
    except UnicodeEncodeError:  # a JSON escape spelled a lone surrogate
        raise InvalidRequest(f"field {name!r}: not encodable as UTF-8") from None
    if size > MAX_SPEC_BYTES:
        raise InvalidRequest(f"field {name!r}: longer than {MAX_SPEC_BYTES} bytes")
