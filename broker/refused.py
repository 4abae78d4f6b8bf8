"""Request fields that vLLM's and OpenAI's APIs define and this server does not honour (yet).

A request that sets one of them to a value that would change its output is refused by name
(``invalid_request`` on the protocol, a 400 at the gateway), never run as if the field had not been
sent; set to its neutral value (``n`` 1, ``skip_special_tokens`` true...), it is accepted. Fields
named nowhere stay ignored, as CONTRACT.md says.
"""

from __future__ import annotations

import json
from typing import Any

_OFF, _ON = frozenset({"0", "false"}), frozenset({"1", "true"})
# Request fields of vLLM's and OpenAI's APIs that ryzanstein does not honour (yet), with the values
# that change nothing (None: every value changes something). Set to anything else, a request ends
# with invalid_request naming the field, rather than running as if it had not been sent. Fields
# named nowhere stay ignored (CONTRACT.md).
UNHONOURED_FIELDS: dict[str, frozenset[str] | None] = {
    "use_beam_search": _OFF,
    "length_penalty": frozenset({"1", "1.0"}),
    "allowed_token_ids": None,
    "logits_processors": None,
    # structured output (guided_json, response_format...) is honoured: broker.structured
    "guided_whitespace_pattern": None,
    "include_stop_str_in_output": _OFF,
    "skip_special_tokens": _ON,
    "spaces_between_special_tokens": _ON,
    "truncate_prompt_tokens": None,
}


def unhonoured_field(raw: dict[str, Any], table: dict[str, frozenset[str] | None] = UNHONOURED_FIELDS) -> str | None:
    """The first field of ``table`` that ``raw`` (field name -> value, as sent) sets to a value that
    would change the output; None when there is none. Unset and null values count as not sent."""
    for name, neutral in table.items():
        value = raw.get(name)
        if value is None:
            continue
        canonical = _canonical(value)
        if canonical != "null" and (neutral is None or canonical not in neutral):
            return name
    return None


def _canonical(value: Any) -> str:
    """A value as comparable text: JSON text parsed, then booleans as true/false, numbers as
    Python writes them, text lower-cased and stripped, maps and arrays as compact sorted JSON."""
    if isinstance(value, bytes):
        value = value.decode("utf-8", "replace")
    if isinstance(value, str):
        text: str = value
        try:
            value = json.loads(text)
        except (ValueError, RecursionError):
            return text.strip().lower()
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, str):
        return value.strip().lower()
    try:
        return json.dumps(_decoded(value), sort_keys=True, separators=(",", ":"), default=repr)
    except (TypeError, ValueError, RecursionError):
        return repr(value)


def _decoded(value: Any) -> Any:
    """msgpack's raw strings (bytes) inside maps and arrays, as text."""
    if isinstance(value, bytes):
        return value.decode("utf-8", "replace")
    if isinstance(value, dict):
        return {str(_decoded(k)): _decoded(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_decoded(v) for v in value]
    return value
