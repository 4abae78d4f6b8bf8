"""Building a request's ingress entry, and reading the events that come back.

Plain Python, no Redis: the flat-field protocol of CONTRACT.md as the clients speak it.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any, TypedDict

from broker.errors import InvalidRequest, RequestFailed
from broker.events import FINAL_EVENTS
from broker.protocol import ID_RE


class GenerationOptions(TypedDict, total=False):
    """What a request asks of the generation (CONTRACT.md, "Requests"); None = unset. The gateway and
    batch jobs, which name the request's id, input and streaming themselves, pass these through."""

    max_tokens: int | None
    temperature: float | None  # 0 = greedy
    top_p: float | None
    top_k: int | None  # 0 = off
    seed: int | None
    stop: str | Sequence[str] | None  # one stop string or several
    stop_token_ids: Sequence[int] | None  # generation ends on any of these token ids
    model: str | None  # a served model name; default: the only model served (or the configured default)
    priority: int | None  # lower is served earlier
    timeout_s: float | None  # server-side deadline from enqueue (not how long the client waits)
    # sampling controls, with vLLM's meanings (PROTOCOL.md, "Sampling controls")
    presence_penalty: float | None  # [-2, 2]
    frequency_penalty: float | None  # [-2, 2]
    repetition_penalty: float | None  # (0, 2]; 1 = off
    min_p: float | None  # [0, 1]
    min_tokens: int | None  # no EOS or stop string before this many tokens
    ignore_eos: bool  # go on through EOS
    logit_bias: Mapping[int | str, float] | None  # token id -> bias in [-100, 100]
    bad_words: Sequence[str] | None  # words the output never contains
    fit_max_tokens: bool  # max_tokens is a ceiling: a long prompt gets the room it leaves
    logprobs: bool  # events carry each token's logprob (PROTOCOL.md, "Logprobs")
    top_logprobs: int | None  # and this many likeliest alternatives (0-20; needs logprobs)
    prompt_logprobs: int | None  # the prompt tokens' logprobs, with this many alternatives (0-20)
    n: int | None  # completions returned (PROTOCOL.md, "Several completions")
    best_of: int | None  # completions generated, the n likeliest returned (not with stream)
    # structured output (PROTOCOL.md, "Structured output"): at most one of these
    guided_json: Mapping[str, Any] | str | None  # a JSON schema (or its JSON text) the output matches
    guided_regex: str | None  # a regular expression the output matches
    guided_choice: Sequence[str] | None  # the output is one of these strings
    guided_grammar: str | None  # an EBNF (GBNF, `root ::= ...`) or Lark grammar the output matches
    response_format: Mapping[str, Any] | str | None  # OpenAI's: {"type": "json_object"} or {"type": "json_schema", ...}
    structured_outputs: Mapping[str, Any] | str | None  # vLLM's: {"json": ...} or regex, choice, grammar, json_object


class RequestOptions(GenerationOptions, total=False):
    """Everything a request may carry besides its prompt (CONTRACT.md, "Requests"); None = unset."""

    prompt_ids: Sequence[int] | None  # token ids instead of a prompt
    stream: bool  # also send one `token` event per generated token
    request_id: str | None  # default: a fresh uuid4 hex
    reply_to: str | None  # default: the client's choice (see Client / AsyncClient)


@dataclass(frozen=True, slots=True)
class Handle:
    """A submitted request: its id and the stream its events go to."""

    id: str
    reply_to: str
    # The ingress entry that carried it (XADD's reply), when this client sent it: lets a reader tell
    # a result that expired from one not written yet (producer.expiry).
    entry_id: str | None = field(default=None, compare=False)
    # The ingress stream that entry went to (a tenant's own, or one of the shards: ingress_shards).
    ingress: str | None = field(default=None, compare=False)
    # The request's cancel token (a secret: only a cancel carrying it ends the request).
    cancel_token: str | None = field(default=None, compare=False, repr=False)


@dataclass(frozen=True, slots=True)
class Choice:
    """One completion of a request with several (``n`` > 1 or ``best_of``)."""

    index: int
    text: str
    token_ids: list[int]
    finish_reason: str
    logprobs: list[dict[str, Any] | None] | None = None  # as Completion.logprobs
    cumulative_logprob: float | None = None  # sum of its tokens' logprobs, when known

    @classmethod
    def from_json(cls, raw: Any) -> Choice:
        if not isinstance(raw, dict):
            raise TypeError("a choice is not a JSON object")
        token_ids = raw["token_ids"]
        if not isinstance(token_ids, list) or not all(isinstance(t, int) for t in token_ids):
            raise ValueError("a choice's token_ids is not a JSON array of integers")
        return cls(index=int(raw["index"]), text=str(raw["text"]), token_ids=token_ids,
                   finish_reason=str(raw["finish_reason"]), logprobs=raw.get("logprobs"),
                   cumulative_logprob=raw.get("cumulative_logprob"))


@dataclass(frozen=True, slots=True)
class Completion:
    """The outcome of a request that ended with a ``done`` event. With several completions
    (``n`` > 1), ``text``, ``token_ids``, ``finish_reason`` and ``logprobs`` are the first's, and
    ``choices`` holds them all; ``completion_tokens`` counts all of them."""

    id: str
    text: str
    token_ids: list[int]
    finish_reason: str  # stop | length | cancelled
    prompt_tokens: int
    completion_tokens: int
    # One entry per token id when the request asked for logprobs (PROTOCOL.md, "Logprobs"):
    # {"token_id", "text", "logprob", "top_logprobs": [{"token_id", "text", "logprob"}]}, or None
    # for a token generated before the request moved between groups.
    logprobs: list[dict[str, Any] | None] | None = None
    # Who served it, and when (seconds from the request's entry into the ingress stream, on the
    # Redis clock): first scheduled in the group that finished it, its first token there, its end.
    # None where the done event does not say (a request cancelled before it reached a group).
    model: str | None = None
    group: str | None = None
    queue_s: float | None = None
    ttft_s: float | None = None
    total_s: float | None = None
    # Every completion of a request with several; None for a request with one (see ``all_choices``).
    choices: list[Choice] | None = None
    # One entry per prompt token (None for the first), when the request asked for prompt_logprobs.
    prompt_logprobs: list[dict[str, Any] | None] | None = None

    def all_choices(self) -> list[Choice]:
        """The completions: ``choices``, or the one completion as a ``Choice``."""
        if self.choices is not None:
            return self.choices
        return [Choice(0, self.text, self.token_ids, self.finish_reason, self.logprobs)]

    @classmethod
    def from_event(cls, event: Event) -> Completion:
        """The completion a ``done`` event carries; RequestFailed for an ``error`` event."""
        event.raise_for_error()
        if event.kind != "done":
            raise ValueError(f"not a final event: {event.kind!r}")
        try:
            token_ids = json.loads(event.fields["token_ids"])
            if not isinstance(token_ids, list) or not all(isinstance(t, int) for t in token_ids):
                raise ValueError("token_ids is not a JSON array of integers")
            logprobs = json.loads(event.fields["logprobs"]) if "logprobs" in event.fields else None
            if logprobs is not None and (not isinstance(logprobs, list) or len(logprobs) != len(token_ids)):
                raise ValueError("logprobs is not a JSON array with one entry per token")
            choices = None
            if "choices" in event.fields:
                raw_choices = json.loads(event.fields["choices"])
                if not isinstance(raw_choices, list) or not raw_choices:
                    raise ValueError("choices is not a non-empty JSON array")
                choices = [Choice.from_json(c) for c in raw_choices]
            prompt_logprobs = json.loads(event.fields["prompt_logprobs"]) if "prompt_logprobs" in event.fields else None
            if prompt_logprobs is not None and not isinstance(prompt_logprobs, list):
                raise ValueError("prompt_logprobs is not a JSON array")
            return cls(
                id=event.id,
                text=event.fields["text"],
                token_ids=token_ids,
                finish_reason=event.fields["finish_reason"],
                prompt_tokens=int(event.fields["prompt_tokens"]),
                completion_tokens=int(event.fields["completion_tokens"]),
                logprobs=logprobs,
                model=event.fields.get("model"),
                group=event.fields.get("group"),
                **{name: _seconds(event.fields.get(name)) for name in ("queue_s", "ttft_s", "total_s")},
                choices=choices,
                prompt_logprobs=prompt_logprobs,
            )
        except (KeyError, ValueError, TypeError) as exc:
            raise RequestFailed(event.id, "internal", f"malformed done event: {exc!r}") from None

    def to_json(self) -> dict[str, Any]:
        """The fields as JSON values; ``logprobs`` only when the request asked for them."""
        out = asdict(self)
        for name in ("logprobs", "model", "group", "queue_s", "ttft_s", "total_s", "choices", "prompt_logprobs"):
            if out[name] is None:
                del out[name]
        return out


@dataclass(frozen=True, slots=True)
class Event:
    """One entry of a reply stream: ``kind`` is token, done or error; ``fields`` are all its fields."""

    id: str
    kind: str
    fields: dict[str, str]
    entry_id: str = ""  # the stream entry id it was read from

    @classmethod
    def from_entry(cls, entry_id: bytes | str, raw: dict[Any, Any]) -> Event | None:
        """Parse a reply-stream entry; None for an entry that is not an event (no id or event)."""
        fields = {_text(k): _text(v) for k, v in raw.items()}
        if "id" not in fields or "event" not in fields:
            return None
        return cls(id=fields["id"], kind=fields["event"], fields=fields, entry_id=_text(entry_id))

    @property
    def final(self) -> bool:
        """Whether this is the request's one final event (done or error)."""
        return self.kind in FINAL_EVENTS

    @property
    def text(self) -> str:
        """A token event's text delta, a done event's whole text; "" otherwise."""
        return self.fields.get("text", "")

    @property
    def choice(self) -> int:
        """The completion a token event belongs to (0 unless the request asked for several)."""
        try:
            return int(self.fields.get("choice", "0"))
        except ValueError:
            return 0

    @property
    def logprobs(self) -> dict[str, Any] | None:
        """A token event's logprobs entry (see ``Completion.logprobs``); None when it has none."""
        raw = self.fields.get("logprobs")
        try:
            entry = json.loads(raw) if raw is not None else None
        except ValueError:
            return None
        return entry if isinstance(entry, dict) else None

    def raise_for_error(self) -> None:
        if self.kind == "error":
            raise RequestFailed.of(self.id, self.fields.get("code", "internal"), self.fields.get("message", ""))


def _int_text(name: str, value: Any) -> str:
    """An option as protocol text; InvalidRequest naming it (never a bare ValueError) if it is none."""
    try:
        return str(int(value))
    except (TypeError, ValueError, OverflowError):
        raise InvalidRequest(f"field '{name}': expected an integer, got {value!r:.40}") from None


def _float_text(name: str, value: Any) -> str:
    try:
        return repr(float(value))
    except (TypeError, ValueError, OverflowError):
        raise InvalidRequest(f"field '{name}': expected a number, got {value!r:.40}") from None


def _seconds(value: str | None) -> float | None:
    return float(value) if value is not None else None


def _text(value: bytes | str) -> str:
    return value.decode("utf-8", "replace") if isinstance(value, bytes) else str(value)


def event_id(entry_id: bytes | str) -> str:
    """A stream entry id as text."""
    return _text(entry_id)


def new_request_id() -> str:
    return uuid.uuid4().hex


def request_fields(
    prompt: str | None = None,
    *,
    request_id: str,
    prompt_ids: Sequence[int] | None = None,
    max_tokens: int | None = None,
    temperature: float | None = None,
    top_p: float | None = None,
    top_k: int | None = None,
    seed: int | None = None,
    stop: str | Sequence[str] | None = None,
    stop_token_ids: Sequence[int] | None = None,
    model: str | None = None,
    stream: bool = False,
    priority: int | None = None,
    timeout_s: float | None = None,
    reply_to: str | None = None,
    cancel_token: str | None = None,
    presence_penalty: float | None = None,
    frequency_penalty: float | None = None,
    repetition_penalty: float | None = None,
    min_p: float | None = None,
    min_tokens: int | None = None,
    ignore_eos: bool = False,
    logit_bias: Mapping[int | str, float] | None = None,
    bad_words: Sequence[str] | None = None,
    logprobs: bool = False,
    top_logprobs: int | None = None,
    fit_max_tokens: bool = False,
    prompt_logprobs: int | None = None,
    n: int | None = None,
    best_of: int | None = None,
    guided_json: Mapping[str, Any] | str | None = None,
    guided_regex: str | None = None,
    guided_choice: Sequence[str] | None = None,
    guided_grammar: str | None = None,
    response_format: Mapping[str, Any] | str | None = None,
    structured_outputs: Mapping[str, Any] | str | None = None,
) -> dict[str, str]:
    """The ingress entry for one request: flat string fields, only those that are set.

    Catches the mistakes that are the caller's alone (no prompt, a bad id); everything else is
    validated where every client's requests are, and comes back as an ``error`` event.
    """
    if (prompt is None) == (prompt_ids is None):
        raise InvalidRequest("exactly one of 'prompt' and 'prompt_ids' must be given")
    if not ID_RE.fullmatch(request_id):
        raise InvalidRequest(
            f"field 'id': must be 1-128 characters of [A-Za-z0-9_.:-], got {request_id!r:.60}"
        )
    fields = {"id": request_id}
    if prompt is not None:
        fields["prompt"] = prompt
    if prompt_ids is not None:
        fields["prompt_ids"] = json.dumps([int(t) for t in prompt_ids], separators=(",", ":"))
    for name, value in (("max_tokens", max_tokens), ("top_k", top_k), ("seed", seed), ("priority", priority)):
        if value is not None:
            fields[name] = _int_text(name, value)
    for name, number in (("temperature", temperature), ("top_p", top_p), ("timeout_s", timeout_s)):
        if number is not None:
            fields[name] = _float_text(name, number)
    if stop is not None:
        fields["stop"] = json.dumps([stop] if isinstance(stop, str) else list(stop))
    if stop_token_ids is not None:
        fields["stop_token_ids"] = json.dumps([int(t) for t in stop_token_ids], separators=(",", ":"))
    if model is not None:
        fields["model"] = model
    if stream:
        fields["stream"] = "1"
    if reply_to is not None:
        fields["reply_to"] = reply_to
    if cancel_token is not None:
        fields["cancel_token"] = cancel_token
    fields.update(_control_fields(presence_penalty=presence_penalty, frequency_penalty=frequency_penalty,
                                  repetition_penalty=repetition_penalty, min_p=min_p, min_tokens=min_tokens,
                                  ignore_eos=ignore_eos, logit_bias=logit_bias, bad_words=bad_words))
    if fit_max_tokens:
        fields["fit_max_tokens"] = "1"
    if logprobs:
        fields["logprobs"] = "1"
    if top_logprobs is not None:
        fields["top_logprobs"] = _int_text("top_logprobs", top_logprobs)
    for name, count in (("prompt_logprobs", prompt_logprobs), ("n", n), ("best_of", best_of)):
        if count is not None:
            fields[name] = _int_text(name, count)
    fields.update(_structured_fields(guided_json=guided_json, guided_regex=guided_regex, guided_choice=guided_choice,
                                     guided_grammar=guided_grammar, response_format=response_format,
                                     structured_outputs=structured_outputs))
    return fields


def _structured_fields(**given: Mapping[str, Any] | Sequence[str] | str | None) -> dict[str, str]:
    """The structured-output fields that are set, as flat text: text as it is, maps and arrays as JSON."""
    fields = {}
    for name, value in given.items():
        if isinstance(value, str):
            fields[name] = value
        elif isinstance(value, Mapping):
            fields[name] = json.dumps(dict(value), ensure_ascii=False)
        elif value is not None:
            fields[name] = json.dumps(list(value), ensure_ascii=False)
    return fields


def _control_fields(
    *,
    presence_penalty: float | None,
    frequency_penalty: float | None,
    repetition_penalty: float | None,
    min_p: float | None,
    min_tokens: int | None,
    ignore_eos: bool,
    logit_bias: Mapping[int | str, float] | None,
    bad_words: Sequence[str] | None,
) -> dict[str, str]:
    """The sampling-control fields that are set, as flat text."""
    fields = {}
    for name, number in (("presence_penalty", presence_penalty), ("frequency_penalty", frequency_penalty),
                         ("repetition_penalty", repetition_penalty), ("min_p", min_p)):
        if number is not None:
            fields[name] = _float_text(name, number)
    if min_tokens is not None:
        fields["min_tokens"] = _int_text("min_tokens", min_tokens)
    if ignore_eos:
        fields["ignore_eos"] = "1"
    if logit_bias is not None:
        fields["logit_bias"] = json.dumps({str(k): float(_float_text("logit_bias", v)) for k, v in logit_bias.items()})
    if bad_words is not None:
        fields["bad_words"] = json.dumps(list(bad_words))
    return fields
