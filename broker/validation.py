"""Ingress entries -> validated ``GenerationRequest``s.

Ingress entries come from any Redis client, so every value arrives as bytes and may be anything.
``parse_request`` turns any input into either a valid request or an ``InvalidRequest`` whose message
names the field and the problem; it never raises anything else (fuzzed in tests/broker).
``best_effort_reply_to`` finds where to answer a request that failed validation.
"""

from __future__ import annotations

import json
import math
import re
from typing import Any

import msgpack
from pydantic import ValidationError

from broker.errors import InvalidRequest
from broker.keys import Keys
from broker.protocol import (
    ID_RE,
    LOGIT_BIAS_LIMIT,
    MAX_BAD_WORDS,
    MAX_KEY_BYTES,
    MAX_LOGIT_BIAS,
    MAX_STOP_STRINGS,
    MAX_STOP_TOKEN_IDS,
    MAX_TOKEN_BYTES,
    MODEL_NAME_RE,
    UINT64_MAX,
    GenerationRequest,
    SamplingParams,
    entry_ms,
    is_later_entry_id,
)
from broker.refused import unhonoured_field
from broker.signing import SIGNATURE_FIELD, verify
from broker.structured import parse_structured

# --- parsing ------------------------------------------------------------------------------------

_TRUE = {"1", "true"}
_FALSE = {"0", "false"}


def _text(name: str, value: Any) -> str:
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


def _show(text: str) -> str:
    return repr(text if len(text) <= 40 else text[:40] + "...")


def _int(name: str, value: Any) -> int:
    if isinstance(value, (bool, float)):
        raise InvalidRequest(f"field '{name}': expected an integer, got {value!r}")
    if isinstance(value, int):
        return value
    text = _text(name, value).strip()
    if not re.fullmatch(r"[+-]?\d{1,20}", text):
        raise InvalidRequest(f"field '{name}': expected an integer, got {_show(text)}")
    return int(text)


def _float(name: str, value: Any) -> float:
    if isinstance(value, bool):
        raise InvalidRequest(f"field '{name}': expected a number, got {value!r}")
    if isinstance(value, (int, float)):
        number = float(value)
    else:
        text = _text(name, value).strip()
        try:
            number = float(text)
        except ValueError:
            raise InvalidRequest(f"field '{name}': expected a number, got {_show(text)}") from None
    if not math.isfinite(number):
        raise InvalidRequest(f"field '{name}': must be a finite number")
    return number


def _bool(name: str, value: Any) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, int) and value in (0, 1):
        return bool(value)
    text = _text(name, value).strip().lower() if not isinstance(value, int) else str(value)
    if text in _TRUE:
        return True
    if text in _FALSE:
        return False
    raise InvalidRequest(f"field '{name}': expected 0, 1, true or false, got {_show(text)}")


def _json_list(name: str, value: Any) -> list[Any]:
    if isinstance(value, (list, tuple)):
        return list(value)
    text = _text(name, value)
    try:
        parsed = json.loads(text)
    except (ValueError, RecursionError):
        raise InvalidRequest(f"field '{name}': expected a JSON array, got {_show(text)}") from None
    if not isinstance(parsed, list):
        raise InvalidRequest(f"field '{name}': expected a JSON array, got {type(parsed).__name__}")
    return parsed


def _token_ids(value: Any, name: str = "prompt_ids", *, empty_ok: bool = False) -> tuple[int, ...]:
    items = _json_list(name, value)
    if not items and not empty_ok:
        raise InvalidRequest(f"field '{name}': must not be empty")
    for item in items:
        if isinstance(item, bool) or not isinstance(item, int):
            raise InvalidRequest(f"field '{name}': every item must be an integer, got {item!r:.40}")
        if item < 0 or item > UINT64_MAX:
            raise InvalidRequest(f"field '{name}': token id {item} is out of range")
    return tuple(items)


def _stop_token_ids(value: Any) -> tuple[int, ...]:
    ids = _token_ids(value, "stop_token_ids", empty_ok=True)
    if len(ids) > MAX_STOP_TOKEN_IDS:
        raise InvalidRequest(f"field 'stop_token_ids': at most {MAX_STOP_TOKEN_IDS} ids, got {len(ids)}")
    return ids


def _model(value: Any) -> str:
    name = _text("model", value)
    if not MODEL_NAME_RE.fullmatch(name):
        raise InvalidRequest(f"field 'model': must be 1-256 characters of [A-Za-z0-9_.:/@+=-], got {_show(name)}")
    return name


def _strings(field: str, value: Any, *, limit: int, noun: str, blank_ok: bool) -> tuple[str, ...]:
    """A JSON array (or list) of at most ``limit`` non-empty strings; ``blank_ok=False`` refuses
    whitespace-only ones too. Raises InvalidRequest naming ``field``."""
    items = _json_list(field, value)
    if len(items) > limit:
        raise InvalidRequest(f"field {field!r}: at most {limit} {noun}, got {len(items)}")
    out = []
    for item in items:
        text = _text(field, item) if isinstance(item, (str, bytes)) else None
        if not text or not (blank_ok or text.strip()):
            kind = "non-empty" if blank_ok else "non-blank"
            raise InvalidRequest(f"field {field!r}: every item must be a {kind} string, got {item!r:.40}")
        out.append(text)
    return tuple(out)


def _stop(value: Any) -> tuple[str, ...]:
    return _strings("stop", value, limit=MAX_STOP_STRINGS, noun="stop strings", blank_ok=True)


def _fields_size(fields: dict[Any, Any]) -> int:
    return sum(len(k) + (len(v) if isinstance(v, (bytes, str)) else 8) for k, v in fields.items())


def _unpack_payload(data: Any) -> dict[str, Any]:
    if not isinstance(data, bytes):
        data = _text("payload", data).encode("utf-8")
    try:
        obj = msgpack.unpackb(data, raw=True, strict_map_key=False)
    except Exception as exc:  # noqa: BLE001 - msgpack raises several unrelated types on malformed input
        raise InvalidRequest(f"field 'payload': not valid msgpack ({type(exc).__name__})") from None
    if not isinstance(obj, dict):
        raise InvalidRequest(f"field 'payload': expected a msgpack map, got {type(obj).__name__}")
    out: dict[str, Any] = {}
    for key, value in obj.items():
        if isinstance(key, bytes):
            try:
                key = key.decode("utf-8")
            except UnicodeDecodeError:
                continue
        if isinstance(key, str):
            out[key] = value
    return out


def parse_request(
    fields: dict[bytes, bytes] | dict[str, Any],
    *,
    entry_id: str,
    prefix: str,
    max_request_bytes: int,
    default_max_tokens: int = 16,
    signing_key: bytes | None = None,
) -> GenerationRequest:
    """Validate one ingress entry. Raises ``InvalidRequest`` (and nothing else) on bad input.

    Fields whose names start with ``_`` are the pipeline's own (``to_ingress``): they count only in
    a ``payload`` signed under ``signing_key`` (broker.signing); anywhere else they are refused.
    """
    try:
        return _parse(fields, entry_id, prefix, max_request_bytes, default_max_tokens, signing_key)
    except InvalidRequest:
        raise
    except ValidationError as exc:
        err = exc.errors()[0]
        where = ".".join(str(p) for p in err["loc"] if p != "sampling") or "request"
        raise InvalidRequest(f"field '{where}': {err['msg']}") from None
    except Exception as exc:  # noqa: BLE001 - last line of defence: a bad request must never crash a process
        raise InvalidRequest(f"request could not be parsed: {type(exc).__name__}") from None


def _signed(raw: dict[str, Any], signing_key: bytes | None) -> bool:
    """Whether the entry (its fields, names decoded) is a payload signed by the pipeline."""
    return verify(signing_key, raw.get("payload"), raw.get(SIGNATURE_FIELD))


def _parse(
    fields: dict[Any, Any], entry_id: str, prefix: str, max_bytes: int, default_max_tokens: int,
    signing_key: bytes | None,
) -> GenerationRequest:
    size = _fields_size(fields)
    if size > max_bytes:
        raise InvalidRequest(f"request is {size} bytes, over the limit of {max_bytes} bytes")
    raw: dict[str, Any] = {}
    for key, value in fields.items():
        if isinstance(key, bytes):
            try:
                key = key.decode("utf-8")
            except UnicodeDecodeError:
                continue  # unknown (and unreadable) field names are ignored, like any unknown field
        raw[key] = value
    signed = _signed(raw, signing_key)
    if "payload" in raw:
        raw = _unpack_payload(raw["payload"])
    if not signed and (internal := next((k for k in raw if k.startswith("_")), None)) is not None:
        # a client's entry never claims what only the pipeline may: a takeover, an earlier arrival
        raise InvalidRequest(f"field {_show(internal)}: names starting with '_' are internal to the pipeline "
                             "(docs/PROTOCOL.md); leave them out")

    request_id = entry_id if raw.get("id") is None else _text("id", raw["id"])
    if (name := unhonoured_field(raw)) is not None:
        raise InvalidRequest(f"field '{name}': not supported by this server (leave it unset)")
    if not ID_RE.fullmatch(request_id):
        raise InvalidRequest(f"field 'id': must be 1-128 characters of [A-Za-z0-9_.:-], got {_show(request_id)}")
    if not signed and is_later_entry_id(request_id, entry_id):
        # a later request sent without an id gets that entry id as its id: taken now, it would be squatted
        raise InvalidRequest(f"field 'id': {_show(request_id)} has the shape of a stream entry id after this "
                             "request's own; such ids are the ids of later requests sent without 'id'")

    has_prompt, has_ids = raw.get("prompt") is not None, raw.get("prompt_ids") is not None
    if has_prompt == has_ids:
        raise InvalidRequest("exactly one of 'prompt' and 'prompt_ids' must be given")
    prompt = _text("prompt", raw["prompt"]) if has_prompt else None
    if prompt == "":
        raise InvalidRequest("field 'prompt': must not be empty")
    prompt_ids = _token_ids(raw["prompt_ids"]) if has_ids else None

    sampling: dict[str, Any] = {"max_tokens": default_max_tokens}
    for name, convert in (("max_tokens", _int), ("temperature", _float), ("top_p", _float), ("top_k", _int)):
        if raw.get(name) is not None:
            sampling[name] = convert(name, raw[name])
    if raw.get("seed") is not None:
        sampling["seed"] = _int("seed", raw["seed"])
    if raw.get("stop") is not None:
        sampling["stop"] = _stop(raw["stop"])
    if raw.get("stop_token_ids") is not None:
        sampling["stop_token_ids"] = _stop_token_ids(raw["stop_token_ids"])
    sampling.update(_controls(raw))
    stream = _bool("stream", raw["stream"]) if raw.get("stream") is not None else False
    _check_choices(sampling, stream=stream)
    if sampling.get("min_tokens", 0) > sampling["max_tokens"] >= 1:
        raise InvalidRequest(f"field 'min_tokens': must be at most max_tokens ({sampling['max_tokens']}), "
                             f"got {sampling['min_tokens']}")

    reply_to = f"{prefix}:result:{request_id}"
    if raw.get("reply_to") is not None:
        reply_to = _text("reply_to", raw["reply_to"])
        if not reply_to or len(reply_to.encode()) > MAX_KEY_BYTES:
            raise InvalidRequest(f"field 'reply_to': must be a key name of 1-{MAX_KEY_BYTES} bytes")
        if problem := Keys(prefix).reply_to_problem(reply_to, request_id):
            raise InvalidRequest(f"field 'reply_to': {problem}")

    cancel_token = None
    if raw.get("cancel_token") is not None:
        cancel_token = _text("cancel_token", raw["cancel_token"])
        if not 1 <= len(cancel_token.encode()) <= MAX_TOKEN_BYTES:
            raise InvalidRequest(f"field 'cancel_token': must be 1-{MAX_TOKEN_BYTES} bytes")

    enqueued_ms = entry_ms(entry_id)
    takeover_from, takeover_epoch = None, 0
    # Internal fields, set only when ryzanstein itself puts a request back (to_ingress): signed.
    if isinstance(raw.get("_enqueued_ms"), int) and not isinstance(raw["_enqueued_ms"], bool):
        enqueued_ms = raw["_enqueued_ms"]
    takeover = raw.get("_takeover")
    if isinstance(takeover, (list, tuple)) and len(takeover) == 2 and isinstance(takeover[1], int):
        takeover_from, takeover_epoch = _text("_takeover", takeover[0]), takeover[1]
    weights = _text("_weights", raw["_weights"]) if isinstance(raw.get("_weights"), (bytes, str)) else None

    return GenerationRequest(
        id=request_id,
        prompt=prompt,
        prompt_ids=prompt_ids,
        sampling=SamplingParams(**sampling),
        stream=stream,
        priority=_int("priority", raw["priority"]) if raw.get("priority") is not None else 0,
        timeout_s=_float("timeout_s", raw["timeout_s"]) if raw.get("timeout_s") is not None else None,
        reply_to=reply_to,
        cancel_token=cancel_token,
        model=_model(raw["model"]) if raw.get("model") is not None else None,
        enqueued_ms=enqueued_ms,
        takeover_from=takeover_from,
        takeover_epoch=takeover_epoch,
        weights=weights,
    )


# --- sampling controls (vLLM's SamplingParams fields) ---------------------------------------------


def _controls(raw: dict[str, Any]) -> dict[str, Any]:
    """The sampling controls a request sets (penalties, min_p, min_tokens, ignore_eos, logit_bias,
    bad_words), converted; their bounds are checked by ``SamplingParams``."""
    out: dict[str, Any] = {}
    for name in ("presence_penalty", "frequency_penalty", "repetition_penalty", "min_p"):
        if raw.get(name) is not None:
            out[name] = _float(name, raw[name])
    if raw.get("min_tokens") is not None:
        out["min_tokens"] = _int("min_tokens", raw["min_tokens"])
    if raw.get("ignore_eos") is not None:
        out["ignore_eos"] = _bool("ignore_eos", raw["ignore_eos"])
    if raw.get("logit_bias") is not None:
        out["logit_bias"] = _logit_bias(raw["logit_bias"])
    if raw.get("bad_words") is not None:
        out["bad_words"] = _bad_words(raw["bad_words"])
    if raw.get("fit_max_tokens") is not None:
        out["fit_max_tokens"] = _bool("fit_max_tokens", raw["fit_max_tokens"])
    if (structured := parse_structured(raw)) is not None:
        out["structured"] = structured
    if raw.get("logprobs") is not None:
        out["logprobs"] = _bool("logprobs", raw["logprobs"])
    if raw.get("top_logprobs") is not None:
        out["top_logprobs"] = _int("top_logprobs", raw["top_logprobs"])
        if out["top_logprobs"] > 0 and not out.get("logprobs"):
            raise InvalidRequest("field 'top_logprobs': needs logprobs set to true")
    for name in ("prompt_logprobs", "n", "best_of"):
        if raw.get(name) is not None:
            out[name] = _int(name, raw[name])
    return out


def _check_choices(sampling: dict[str, Any], *, stream: bool) -> None:
    """``best_of`` (when set) is at least ``n``, and equals it when streaming: the completions
    returned are only known at the end (vLLM's and OpenAI's rule)."""
    n, best_of = sampling.get("n", 1), sampling.get("best_of")
    if best_of is None or not isinstance(n, int) or n < 1:
        return  # (bounds: SamplingParams)
    if best_of < n:
        raise InvalidRequest(f"field 'best_of': must be at least n ({n}), got {best_of}")
    if stream and best_of > n:
        raise InvalidRequest(f"field 'best_of': must equal n ({n}) when streaming, got {best_of}")


def _logit_bias(value: Any) -> tuple[tuple[int, float], ...]:
    """A JSON object (flat field) or msgpack map of token id -> bias in [-100, 100], in id order."""
    if isinstance(value, dict):
        items = value
    else:
        text = _text("logit_bias", value)
        try:
            items = json.loads(text)
        except (ValueError, RecursionError):
            raise InvalidRequest(f"field 'logit_bias': expected a JSON object, got {_show(text)}") from None
        if not isinstance(items, dict):
            raise InvalidRequest(f"field 'logit_bias': expected a JSON object, got {type(items).__name__}")
    if len(items) > MAX_LOGIT_BIAS:
        raise InvalidRequest(f"field 'logit_bias': at most {MAX_LOGIT_BIAS} entries, got {len(items)}")
    out: dict[int, float] = {}
    for key, bias in items.items():
        token = _int("logit_bias", key)
        if token < 0 or token > UINT64_MAX:
            raise InvalidRequest(f"field 'logit_bias': token id {token} is out of range")
        number = _float("logit_bias", bias)
        if abs(number) > LOGIT_BIAS_LIMIT:
            raise InvalidRequest(f"field 'logit_bias': bias {number} for token {token} is outside "
                                 f"[-{LOGIT_BIAS_LIMIT:g}, {LOGIT_BIAS_LIMIT:g}]")
        out[token] = number
    return tuple(sorted(out.items()))


def _bad_words(value: Any) -> tuple[str, ...]:
    return _strings("bad_words", value, limit=MAX_BAD_WORDS, noun="words", blank_ok=False)


def best_effort_reply_to(fields: dict[Any, Any], *, entry_id: str, prefix: str,
                         signing_key: bytes | None = None) -> tuple[str, str]:
    """(request id, reply stream) for an error about a request that failed validation.

    The client looks for its result under the id it sent, so use that when it is usable as part of a
    key, and the entry id otherwise (also for an id shaped like a later entry id, unless the pipeline
    signed the entry: ``parse_request``).
    """
    raw = {(k.decode("utf-8", "replace") if isinstance(k, bytes) else str(k)): v for k, v in fields.items()}
    signed = _signed(raw, signing_key)
    if "payload" in raw:
        try:
            raw = _unpack_payload(raw["payload"])
        except InvalidRequest:
            raw = {}
    request_id = entry_id
    text = _key_text(raw.get("id"))
    if text is not None and (signed or not is_later_entry_id(text, entry_id)):
        request_id = text  # (a later entry's id is not this request's to answer under)
    reply_to = f"{prefix}:result:{request_id}"
    text = _key_text(raw.get("reply_to"))
    if text is not None and Keys(prefix).reply_to_problem(text, request_id) is None:
        reply_to = text
    return request_id, reply_to


def _key_text(value: Any) -> str | None:
    """``value`` as text usable in a key name, or None: bytes that are not UTF-8 are not decoded with
    replacement characters, which would let different ids (or streams) meet under one key."""
    if isinstance(value, bytes):
        try:
            value = value.decode("utf-8")
        except UnicodeDecodeError:
            return None
    if not isinstance(value, str):
        return None
    try:
        size = len(value.encode("utf-8"))
    except UnicodeEncodeError:  # a lone surrogate (from a JSON escape)
        return None
    return value if 0 < size <= MAX_KEY_BYTES else None
