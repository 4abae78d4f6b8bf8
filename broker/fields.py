"""Request field values as they arrive from any Redis client (bytes, or msgpack values): each
converter returns the value as its Python type or raises ``InvalidRequest`` naming the field and the
problem. broker.validation (the request envelope) and broker.sampling_fields (sampling controls)
build on these.
"""

from __future__ import annotations

import json
import math
import re
from typing import Any

from broker.errors import InvalidRequest
from broker.protocol import UINT64_MAX

_TRUE = {"1", "true"}
_FALSE = {"0", "false"}


def as_text(name: str, value: Any) -> str:
    if isinstance(value, bytes):
        try:
            return value.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise InvalidRequest(f"field '{name}': not valid UTF-8 ({exc.reason} at byte {exc.start})") from None
    if isinstance(value, str):
        if not value.isascii():
            try:  # JSON escapes can spell lone surrogates ("\ud800"), which no UTF-8 writer accepts
                value.encode("utf-8")
            except UnicodeEncodeError as exc:
                raise InvalidRequest(f"field '{name}': not encodable as UTF-8 ({exc.reason} at "
                                     f"character {exc.start})") from None
        return value
    raise InvalidRequest(f"field '{name}': expected text, got {type(value).__name__}")


def show(text: str) -> str:
    return repr(text if len(text) <= 40 else text[:40] + "...")


def as_int(name: str, value: Any) -> int:
    if isinstance(value, (bool, float)):
        raise InvalidRequest(f"field '{name}': expected an integer, got {value!r}")
    if isinstance(value, int):
        return value
    text = as_text(name, value).strip()
    if not re.fullmatch(r"[+-]?\d{1,20}", text):
        raise InvalidRequest(f"field '{name}': expected an integer, got {show(text)}")
    return int(text)


def as_float(name: str, value: Any) -> float:
    if isinstance(value, bool):
        raise InvalidRequest(f"field '{name}': expected a number, got {value!r}")
    if isinstance(value, (int, float)):
        number = float(value)
    else:
        text = as_text(name, value).strip()
        try:
            number = float(text)
        except ValueError:
            raise InvalidRequest(f"field '{name}': expected a number, got {show(text)}") from None
    if not math.isfinite(number):
        raise InvalidRequest(f"field '{name}': must be a finite number")
    return number


def as_bool(name: str, value: Any) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, int) and value in (0, 1):
        return bool(value)
    text = as_text(name, value).strip().lower() if not isinstance(value, int) else str(value)
    if text in _TRUE:
        return True
    if text in _FALSE:
        return False
    raise InvalidRequest(f"field '{name}': expected 0, 1, true or false, got {show(text)}")


def as_json_list(name: str, value: Any) -> list[Any]:
    if isinstance(value, (list, tuple)):
        return list(value)
    text = as_text(name, value)
    try:
        parsed = json.loads(text)
    except (ValueError, RecursionError):
        raise InvalidRequest(f"field '{name}': expected a JSON array, got {show(text)}") from None
    if not isinstance(parsed, list):
        raise InvalidRequest(f"field '{name}': expected a JSON array, got {type(parsed).__name__}")
    return parsed


def as_token_ids(value: Any, name: str = "prompt_ids", *, empty_ok: bool = False) -> tuple[int, ...]:
    items = as_json_list(name, value)
    if not items and not empty_ok:
        raise InvalidRequest(f"field '{name}': must not be empty")
    for item in items:
        if isinstance(item, bool) or not isinstance(item, int):
            raise InvalidRequest(f"field '{name}': every item must be an integer, got {item!r:.40}")
        if item < 0 or item > UINT64_MAX:
            raise InvalidRequest(f"field '{name}': token id {item} is out of range")
    return tuple(items)


def as_strings(field: str, value: Any, *, limit: int, noun: str, blank_ok: bool) -> tuple[str, ...]:
    """A JSON array (or list) of at most ``limit`` non-empty strings; ``blank_ok=False`` refuses
    whitespace-only ones too. Raises InvalidRequest naming ``field``."""
    items = as_json_list(field, value)
    if len(items) > limit:
        raise InvalidRequest(f"field {field!r}: at most {limit} {noun}, got {len(items)}")
    out = []
    for item in items:
        text = as_text(field, item) if isinstance(item, (str, bytes)) else None
        if not text or not (blank_ok or text.strip()):
            kind = "non-empty" if blank_ok else "non-blank"
            raise InvalidRequest(f"field {field!r}: every item must be a {kind} string, got {item!r:.40}")
        out.append(text)
    return tuple(out)
