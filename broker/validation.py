"""Ingress entries -> validated ``GenerationRequest``s: the request envelope (size, payload,
signature, id, prompt, reply stream, cancel token, priority, timeout, model, the pipeline's own
fields); the sampling fields are broker.sampling_fields', the value converters broker.fields'.

Ingress entries come from any Redis client, so every value arrives as bytes and may be anything.
``parse_request`` turns any input into either a valid request or an ``InvalidRequest`` whose message
names the field and the problem; it never raises anything else (fuzzed in tests/broker).
``best_effort_reply_to`` finds where to answer a request that failed validation.
"""

from __future__ import annotations

from typing import Any

import msgpack
from pydantic import ValidationError

from broker.errors import InvalidRequest
from broker.fields import as_bool, as_float, as_int, as_text, as_token_ids, show
from broker.keys import Keys
from broker.protocol import (
    ENTRY_ID_RE,
    ID_RE,
    MAX_KEY_BYTES,
    MAX_TOKEN_BYTES,
    MODEL_NAME_RE,
    GenerationRequest,
    SamplingParams,
    entry_ms,
    is_later_entry_id,
)
from broker.refused import unhonoured_field
from broker.sampling_fields import check_sampling, parse_sampling
from broker.signing import SIGNATURE_FIELD, verify
from broker.sources import TENANT_RE, default_request_id


def _fields_size(fields: dict[Any, Any]) -> int:
    return sum(len(k) + (len(v) if isinstance(v, (bytes, str)) else 8) for k, v in fields.items())


def _unpack_payload(data: Any) -> dict[str, Any]:
    if not isinstance(data, bytes):
        data = as_text("payload", data).encode("utf-8")
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
    tenant: str | None = None,
    now_ms: float | None = None,
) -> GenerationRequest:
    """Validate one ingress entry. Raises ``InvalidRequest`` (and nothing else) on bad input.

    Fields whose names start with ``_`` are the pipeline's own (``to_ingress``): they count only in
    a ``payload`` signed under ``signing_key`` (broker.signing); anywhere else they are refused.
    ``tenant``: the tenant whose ingress stream the entry came from (broker.sources; a signed
    ``_tenant`` counts instead), which binds the request's id default and ``reply_to``. ``now_ms``:
    the Redis clock; an entry id past it (an explicit one) bounds no id (see ``is_later_entry_id``).
    """
    try:
        return _parse(fields, entry_id, prefix, max_request_bytes, default_max_tokens, signing_key, tenant, now_ms)
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
    signing_key: bytes | None, tenant: str | None, now_ms: float | None,
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
        raise InvalidRequest(f"field {show(internal)}: names starting with '_' are internal to the pipeline "
                             "(docs/PROTOCOL.md); leave them out")

    if signed and isinstance(raw.get("_tenant"), (bytes, str)):
        tenant = as_text("_tenant", raw["_tenant"])  # moved back onto the shared stream by the pipeline
    request_id = default_request_id(entry_id, tenant) if raw.get("id") is None else as_text("id", raw["id"])
    if (name := unhonoured_field(raw)) is not None:
        raise InvalidRequest(f"field '{name}': not supported by this server (leave it unset)")
    if not ID_RE.fullmatch(request_id):
        raise InvalidRequest(f"field 'id': must be 1-128 characters of [A-Za-z0-9_.:-], got {show(request_id)}")
    if not signed and raw.get("id") is not None and (why := _squats(request_id, entry_id, tenant, now_ms)):
        # a later request sent without an id gets that id: taken now, it would be squatted
        raise InvalidRequest(f"field 'id': {show(request_id)} {why}")

    has_prompt, has_ids = raw.get("prompt") is not None, raw.get("prompt_ids") is not None
    if has_prompt == has_ids:
        raise InvalidRequest("exactly one of 'prompt' and 'prompt_ids' must be given")
    prompt = as_text("prompt", raw["prompt"]) if has_prompt else None
    if prompt == "":
        raise InvalidRequest("field 'prompt': must not be empty")
    prompt_ids = as_token_ids(raw["prompt_ids"]) if has_ids else None

    sampling = parse_sampling(raw, default_max_tokens=default_max_tokens)
    stream = as_bool("stream", raw["stream"]) if raw.get("stream") is not None else False
    check_sampling(sampling, stream=stream)

    reply_to = Keys(prefix).reply_stream(request_id, tenant=tenant)
    if raw.get("reply_to") is not None:
        reply_to = as_text("reply_to", raw["reply_to"])
        if not reply_to or len(reply_to.encode()) > MAX_KEY_BYTES:
            raise InvalidRequest(f"field 'reply_to': must be a key name of 1-{MAX_KEY_BYTES} bytes")
        if problem := Keys(prefix).reply_to_problem(reply_to, request_id, tenant=tenant):
            raise InvalidRequest(f"field 'reply_to': {problem}")

    cancel_token = None
    if raw.get("cancel_token") is not None:
        cancel_token = as_text("cancel_token", raw["cancel_token"])
        if not 1 <= len(cancel_token.encode()) <= MAX_TOKEN_BYTES:
            raise InvalidRequest(f"field 'cancel_token': must be 1-{MAX_TOKEN_BYTES} bytes")

    enqueued_ms = entry_ms(entry_id)
    takeover_from, takeover_epoch = None, 0
    # Internal fields, set only when ryzanstein itself puts a request back (to_ingress): signed.
    if isinstance(raw.get("_enqueued_ms"), int) and not isinstance(raw["_enqueued_ms"], bool):
        enqueued_ms = raw["_enqueued_ms"]
    takeover = raw.get("_takeover")
    if isinstance(takeover, (list, tuple)) and len(takeover) == 2 and isinstance(takeover[1], int):
        takeover_from, takeover_epoch = as_text("_takeover", takeover[0]), takeover[1]
    weights = as_text("_weights", raw["_weights"]) if isinstance(raw.get("_weights"), (bytes, str)) else None

    return GenerationRequest(
        id=request_id,
        prompt=prompt,
        prompt_ids=prompt_ids,
        sampling=SamplingParams(**sampling),
        stream=stream,
        priority=as_int("priority", raw["priority"]) if raw.get("priority") is not None else 0,
        timeout_s=as_float("timeout_s", raw["timeout_s"]) if raw.get("timeout_s") is not None else None,
        reply_to=reply_to,
        cancel_token=cancel_token,
        model=_model(raw["model"]) if raw.get("model") is not None else None,
        enqueued_ms=enqueued_ms,
        takeover_from=takeover_from,
        takeover_epoch=takeover_epoch,
        weights=weights,
        tenant=tenant,
    )


def _squats(request_id: str, entry_id: str, tenant: str | None, now_ms: float | None) -> str | None:
    """Why an explicit ``request_id`` is the id a later request sent without 'id' would get (None: it
    is not): an entry id after this entry's own, or ``<tenant>:<entry id>`` with such an entry id,
    the id of a later request of that tenant (broker.sources.default_request_id; any tenant's, this
    request's own or another's). A tenant's stream may carry entry ids ahead of the clock (it names
    them itself) while later shared entries get ids by the clock: there the clock bounds it."""
    owner, colon, rest = request_id.partition(":")
    named = colon and TENANT_RE.fullmatch(owner) and ENTRY_ID_RE.fullmatch(rest)
    later_id = rest if named else request_id
    if tenant is None or now_ms is None:
        later = is_later_entry_id(later_id, entry_id)
    else:
        bound = f"{min(entry_ms(entry_id), int(now_ms))}-0"
        later = later_id == bound or is_later_entry_id(later_id, bound)
    if not later:
        return None
    if named:
        return (f"has the form '<tenant>:<entry id>' of the id a later request of tenant {show(owner)} sent "
                "without 'id' gets (docs/PROTOCOL.md, \"Tenants\"); choose another id")
    return ("has the shape of a stream entry id after this request's own; such ids are the ids of later "
            "requests sent without 'id'")


def _model(value: Any) -> str:
    name = as_text("model", value)
    if not MODEL_NAME_RE.fullmatch(name):
        raise InvalidRequest(f"field 'model': must be 1-256 characters of [A-Za-z0-9_.:/@+=-], got {show(name)}")
    return name


def best_effort_reply_to(fields: dict[Any, Any], *, entry_id: str, prefix: str, signing_key: bytes | None = None,
                         tenant: str | None = None, now_ms: float | None = None) -> tuple[str, str]:
    """(request id, reply stream) for an error about a request that failed validation.

    The client looks for its result under the id it sent, so use that when it is usable as part of a
    key, and the entry id otherwise (also for an id shaped like a later entry id, unless the pipeline
    signed the entry: ``parse_request``). A request of ``tenant`` is answered in the tenant's space.
    """
    raw = {(k.decode("utf-8", "replace") if isinstance(k, bytes) else str(k)): v for k, v in fields.items()}
    signed = _signed(raw, signing_key)
    if "payload" in raw:
        try:
            raw = _unpack_payload(raw["payload"])
        except InvalidRequest:
            raw = {}
    if signed and (named := _key_text(raw.get("_tenant"))) is not None:
        tenant = named
    request_id = default_request_id(entry_id, tenant)
    text = _key_text(raw.get("id"))
    if text is not None and (signed or not _squats(text, entry_id, tenant, now_ms)):
        request_id = text  # (a later entry's id is not this request's to answer under)
    reply_to = Keys(prefix).reply_stream(request_id, tenant=tenant)
    text = _key_text(raw.get("reply_to"))
    if text is not None and Keys(prefix).reply_to_problem(text, request_id, tenant=tenant) is None:
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
