"""The wire protocol: ingress entries -> validated ``GenerationRequest``; result events -> fields.

Ingress entries come from any Redis client, so every value arrives as bytes and may be anything.
``parse_request`` turns any input into either a valid request or an ``InvalidRequest`` whose message
names the field and the problem; it never raises anything else (fuzzed in tests/broker).
"""

from __future__ import annotations

import json
import math
import re
from typing import Any, Literal

import msgpack
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from broker.errors import InvalidRequest
from broker.keys import Keys
from broker.refused import unhonoured_field

ID_RE = re.compile(r"[A-Za-z0-9_.:-]{1,128}")
ENTRY_ID_RE = re.compile(r"[0-9]+-[0-9]+")  # a stream entry id, as XADD * makes them
# A served model name: a directory's last component, a hub id ("org/name"), an alias; no spaces.
MODEL_NAME_RE = re.compile(r"[A-Za-z0-9_.:/@+=-]{1,256}")
FinishReason = Literal["stop", "length", "cancelled"]
INT64_MIN, UINT64_MAX = -(1 << 63), (1 << 64) - 1
MAX_STOP_STRINGS = 16
MAX_STOP_TOKEN_IDS = 64
MAX_KEY_BYTES = 512
MAX_TOKEN_BYTES = 256
MAX_LOGIT_BIAS = 1024  # entries of one request's logit_bias
MAX_BAD_WORDS = 128
LOGIT_BIAS_LIMIT = 100.0  # |bias| at most, as OpenAI's API
MAX_TOP_LOGPROBS = 20  # as OpenAI's API


class SamplingParams(BaseModel):
    """How to pick tokens; validated bounds match CONTRACT.md."""

    model_config = ConfigDict(frozen=True, strict=True)

    max_tokens: int = Field(default=16, ge=1, le=1 << 31)
    temperature: float = Field(default=1.0, ge=0.0, le=1e6)
    top_p: float = Field(default=1.0, gt=0.0, le=1.0)
    top_k: int = Field(default=0, ge=0, le=1 << 31)
    seed: int | None = Field(default=None, ge=INT64_MIN, le=UINT64_MAX)
    stop: tuple[str, ...] = Field(default=(), max_length=MAX_STOP_STRINGS)
    stop_token_ids: tuple[int, ...] = Field(default=(), max_length=MAX_STOP_TOKEN_IDS)  # end on any of them
    # --- sampling controls, with vLLM's meanings (docs/PROTOCOL.md, "Sampling controls") ---
    presence_penalty: float = Field(default=0.0, ge=-2.0, le=2.0)
    frequency_penalty: float = Field(default=0.0, ge=-2.0, le=2.0)
    repetition_penalty: float = Field(default=1.0, gt=0.0, le=2.0)
    min_p: float = Field(default=0.0, ge=0.0, le=1.0)
    min_tokens: int = Field(default=0, ge=0, le=1 << 31)
    ignore_eos: bool = False
    logit_bias: tuple[tuple[int, float], ...] = Field(default=(), max_length=MAX_LOGIT_BIAS)  # (token id, bias)
    bad_words: tuple[str, ...] = Field(default=(), max_length=MAX_BAD_WORDS)
    # With it, max_tokens is a ceiling: a prompt that leaves less room in the model's context gets
    # the room it leaves (the gateway's chat requests without max_tokens), not invalid_request.
    fit_max_tokens: bool = False
    # --- logprobs (docs/PROTOCOL.md, "Logprobs") ---
    logprobs: bool = False  # token and done events carry each generated token's logprob
    top_logprobs: int = Field(default=0, ge=0, le=MAX_TOP_LOGPROBS)  # and this many likeliest alternatives

    @property
    def needed_tokens(self) -> int:
        """The fewest tokens the request needs room for after its prompt (``limit_problem``)."""
        return 1 if self.fit_max_tokens else self.max_tokens

    @classmethod
    def from_dump(cls, raw: dict[str, Any]) -> SamplingParams:
        """The inverse of ``model_dump`` after a msgpack round trip (arrays come back as lists)."""
        raw = dict(raw)
        for name in ("stop", "stop_token_ids", "bad_words"):
            if name in raw:
                raw[name] = tuple(raw[name])
        if "logit_bias" in raw:
            raw["logit_bias"] = tuple((int(t), float(b)) for t, b in raw["logit_bias"])
        return cls(**raw)


class GenerationRequest(BaseModel):
    """One validated request, as the balancer forwards it to a worker group."""

    model_config = ConfigDict(frozen=True, strict=True)

    id: str = Field(pattern=f"^{ID_RE.pattern}$", min_length=1, max_length=128)  # pydantic searches: anchor it
    prompt: str | None = None
    prompt_ids: tuple[int, ...] | None = None
    sampling: SamplingParams = SamplingParams()
    stream: bool = False
    priority: int = Field(default=0, ge=INT64_MIN, le=(1 << 63) - 1)
    timeout_s: float | None = Field(default=None, gt=0.0)
    reply_to: str
    # A secret of the client's: only a cancel entry that carries it ends the request (broker.cancellation).
    cancel_token: str | None = Field(default=None, repr=False)
    # The served model name asked for; the balancer sets the one it routed to before dispatch.
    model: str | None = Field(default=None, pattern=f"^{MODEL_NAME_RE.pattern}$")
    # Milliseconds on the Redis clock when the request first entered the ingress stream.
    enqueued_ms: int = 0
    # Set when a group hands the request back (draining) or is failed over: the balancer takes the
    # request over from this owner, if it still holds this epoch (see broker.lua.CLAIM_OWNER).
    takeover_from: str | None = None
    takeover_epoch: int = 0
    # Set by the balancer when it dispatches a request taken over mid-generation: the token ids
    # already published, which the new group continues after (never on the ingress stream).
    output_ids: tuple[int, ...] = ()
    # Fingerprint of the weights that generated ``output_ids`` (set by the balancer at dispatch): a
    # group with other weights refuses to continue such a request (no answer mixes two versions).
    weights: str | None = None

    @property
    def deadline_ms(self) -> float | None:
        """When the request times out, on the Redis clock; None without ``timeout_s``."""
        if self.timeout_s is None:
            return None
        return self.enqueued_ms + self.timeout_s * 1000.0

    def to_wire(self) -> bytes:
        packed: bytes = msgpack.packb(self.model_dump(mode="python"), use_bin_type=True)
        return packed

    def to_ingress(self, *, from_owner: str, epoch: int) -> dict[str, bytes]:
        """Fields that put this request back on the ingress stream, taken over from ``from_owner``."""
        payload = {
            "id": self.id,
            "prompt": self.prompt,
            "prompt_ids": list(self.prompt_ids) if self.prompt_ids is not None else None,
            **self.sampling.model_dump(exclude={"stop", "stop_token_ids", "logit_bias", "bad_words"}),
            "stop": list(self.sampling.stop),
            "stop_token_ids": list(self.sampling.stop_token_ids) or None,
            "logit_bias": {str(t): b for t, b in self.sampling.logit_bias},
            "bad_words": list(self.sampling.bad_words),
            "model": self.model,
            "stream": self.stream,
            "priority": self.priority,
            "timeout_s": self.timeout_s,
            "reply_to": self.reply_to,
            "cancel_token": self.cancel_token,
            "_enqueued_ms": self.enqueued_ms,
            "_takeover": [from_owner, epoch],
            "_weights": self.weights,
        }
        return {"payload": msgpack.packb({k: v for k, v in payload.items() if v is not None}, use_bin_type=True)}

    @classmethod
    def from_wire(cls, data: bytes) -> GenerationRequest:
        raw = msgpack.unpackb(data, raw=False)
        raw["sampling"] = SamplingParams.from_dump(raw["sampling"])
        for name in ("prompt_ids", "output_ids"):
            if raw.get(name) is not None:
                raw[name] = tuple(raw[name])
        return cls(**raw)


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


def is_later_entry_id(request_id: str, entry_id: str) -> bool:
    """Whether ``request_id`` reads as a stream entry id at or after ``entry_id`` (the request's own)."""
    if not ENTRY_ID_RE.fullmatch(request_id) or not ENTRY_ID_RE.fullmatch(entry_id):
        return False
    ms, seq = request_id.split("-")
    own_ms, own_seq = entry_id.split("-")
    return (int(ms), int(seq)) >= (int(own_ms), int(own_seq)) and request_id != entry_id


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
) -> GenerationRequest:
    """Validate one ingress entry. Raises ``InvalidRequest`` (and nothing else) on bad input."""
    try:
        return _parse(fields, entry_id, prefix, max_request_bytes, default_max_tokens)
    except InvalidRequest:
        raise
    except ValidationError as exc:
        err = exc.errors()[0]
        where = ".".join(str(p) for p in err["loc"] if p != "sampling") or "request"
        raise InvalidRequest(f"field '{where}': {err['msg']}") from None
    except Exception as exc:  # noqa: BLE001 - last line of defence: a bad request must never crash a process
        raise InvalidRequest(f"request could not be parsed: {type(exc).__name__}") from None


def _parse(
    fields: dict[Any, Any], entry_id: str, prefix: str, max_bytes: int, default_max_tokens: int
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
    if "payload" in raw:
        raw = _unpack_payload(raw["payload"])

    request_id = entry_id if raw.get("id") is None else _text("id", raw["id"])
    if (name := unhonoured_field(raw)) is not None:
        raise InvalidRequest(f"field '{name}': not supported by this server (leave it unset)")
    if not ID_RE.fullmatch(request_id):
        raise InvalidRequest(f"field 'id': must be 1-128 characters of [A-Za-z0-9_.:-], got {_show(request_id)}")
    if raw.get("_takeover") is None and is_later_entry_id(request_id, entry_id):
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
    # Internal fields, set only when ryzanstein itself puts a request back (to_ingress).
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
        stream=_bool("stream", raw["stream"]) if raw.get("stream") is not None else False,
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
    if raw.get("logprobs") is not None:
        out["logprobs"] = _bool("logprobs", raw["logprobs"])
    if raw.get("top_logprobs") is not None:
        out["top_logprobs"] = _int("top_logprobs", raw["top_logprobs"])
        if out["top_logprobs"] > 0 and not out.get("logprobs"):
            raise InvalidRequest("field 'top_logprobs': needs logprobs set to true")
    return out


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


def entry_ms(entry_id: str | bytes) -> int:
    """The millisecond part of a stream entry id ("1700000000000-0")."""
    if isinstance(entry_id, bytes):
        entry_id = entry_id.decode()
    return int(entry_id.split("-", 1)[0])


def best_effort_reply_to(fields: dict[Any, Any], *, entry_id: str, prefix: str) -> tuple[str, str]:
    """(request id, reply stream) for an error about a request that failed validation.

    The client looks for its result under the id it sent, so use that when it is usable as part of a
    key, and the entry id otherwise.
    """
    raw = {(k.decode("utf-8", "replace") if isinstance(k, bytes) else str(k)): v for k, v in fields.items()}
    if "payload" in raw:
        try:
            raw = _unpack_payload(raw["payload"])
        except InvalidRequest:
            raw = {}
    request_id = entry_id
    text = _key_text(raw.get("id"))
    if text is not None and (raw.get("_takeover") is not None or not is_later_entry_id(text, entry_id)):
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


def limit_problem(prompt_ids: list[int] | tuple[int, ...], max_tokens: int, *, vocab_size: int,
                  max_context: int, logit_bias: tuple[tuple[int, float], ...] = ()) -> str | None:
    """Why a tokenized request cannot run on a model (vocabulary, context length), or None.
    ``max_tokens``: the room it needs after the prompt (``SamplingParams.needed_tokens``)."""
    if not prompt_ids:
        return "the prompt encodes to no tokens"
    top = max(prompt_ids)
    if top >= vocab_size:
        return f"prompt_ids: token id {top} is outside the vocabulary (size {vocab_size})"
    need = len(prompt_ids) + max_tokens
    if logit_bias and (bad := max(t for t, _ in logit_bias)) >= vocab_size:
        return f"logit_bias: token id {bad} is outside the vocabulary (size {vocab_size})"
    if need > max_context:
        return (f"prompt ({len(prompt_ids)} tokens) + max_tokens ({max_tokens}) = {need} exceeds the "
                f"model's context length of {max_context}")
    return None


# --- result events ------------------------------------------------------------------------------


def token_event(request_id: str, index: int, token_id: int, text: str,
                logprobs: dict[str, Any] | None = None) -> dict[str, str]:
    """``logprobs``: this token's entry of the done event's ``logprobs`` (``token_logprobs``), or
    None; sent as ``logprob`` (the number alone, for reading by eye) and ``logprobs`` (the entry)."""
    event = {"id": request_id, "event": "token", "index": str(index), "token_id": str(token_id), "text": text}
    if logprobs is not None:
        event["logprob"] = repr(logprobs["logprob"])
        event["logprobs"] = _json(logprobs)
    return event


def token_logprobs(token_id: int, text: str, logprob: float, top: list[tuple[int, str, float]]) -> dict[str, Any]:
    """One generated token's logprobs as events carry them: ``{"token_id", "text", "logprob",
    "top_logprobs": [{"token_id", "text", "logprob"}, ...]}``, likeliest first. JSON has no -inf:
    a logprob below -9999 is written as -9999.0, as vLLM's OpenAI server does."""
    return {"token_id": token_id, "text": text, "logprob": max(logprob, LOGPROB_FLOOR),
            "top_logprobs": [{"token_id": t, "text": s, "logprob": max(lp, LOGPROB_FLOOR)} for t, s, lp in top]}


LOGPROB_FLOOR = -9999.0


def _json(value: Any) -> str:
    return json.dumps(value, ensure_ascii=False, separators=(",", ":"))


def done_event(
    request_id: str,
    *,
    text: str,
    token_ids: list[int],
    finish_reason: FinishReason,
    prompt_tokens: int,
    logprobs: list[dict[str, Any] | None] | None = None,
    served: dict[str, str] | None = None,
) -> dict[str, str]:
    """``logprobs``: one ``token_logprobs`` entry per token id (None for a token generated before
    the request moved to this group), or None when the request did not ask for them. ``served``:
    ``model``, ``group`` and the timings ``queue_s``, ``ttft_s``, ``total_s`` (seconds as text)."""
    extra = {"logprobs": _json(logprobs)} if logprobs is not None else {}
    extra.update(served or {})
    return {
        "id": request_id,
        "event": "done",
        "text": text,
        "token_ids": json.dumps(token_ids, separators=(",", ":")),
        "finish_reason": finish_reason,
        "prompt_tokens": str(prompt_tokens),
        "completion_tokens": str(len(token_ids)),
        **extra,
    }


def error_event(request_id: str, code: str, message: str) -> dict[str, str]:
    return {"id": request_id, "event": "error", "code": code, "message": message}


FINAL_EVENTS = frozenset({"done", "error"})
