"""The OpenAI request shapes the gateway reads, and their mapping to ryzanstein requests (the
response shapes: producer.gateway.responses).

Requests are validated here: what ryzanstein cannot do (tools, beam search...)
is refused with a 400 naming the parameter, rather than silently ignored; parameters that change
nothing in the output (``user``, ``metadata``, ``store``...) are accepted and ignored. Extensions, sent
by the openai package through ``extra_body``: vLLM's ``repetition_penalty``, ``min_p``,
``min_tokens``, ``ignore_eos``, ``stop_token_ids``, ``bad_words``; structured output: OpenAI's ``response_format``
(``json_object``, ``json_schema``) and vLLM's ``guided_json``, ``guided_regex``, ``guided_choice``,
``guided_grammar``, ``structured_outputs`` (broker.structured; a shape it refuses is a 400 naming the
field, a schema or grammar that does not compile one from the worker group); ryzanstein's
``top_k``, ``priority`` and ``timeout_s`` (seconds; the server-side deadline).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any, Literal, get_args

from pydantic import BaseModel, ConfigDict, ValidationError

from broker.errors import InvalidRequest
from broker.protocol import MAX_N, MAX_TOP_LOGPROBS
from broker.refused import UNHONOURED_FIELDS, unhonoured_field
from broker.structured import StructuredOutput, parse_structured
from producer.chat_template import normalize_messages
from producer.gateway.errors import ApiError
from producer.request import GenerationOptions

Kind = Literal["completion", "chat"]


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="ignore")

    include_usage: bool = False
    continuous_usage_stats: bool = False  # vLLM's usage in every chunk: refused when true


class _Common(BaseModel):
    """Fields both endpoints share. Unknown fields are ignored, as OpenAI-compatible servers do."""

    model_config = ConfigDict(extra="ignore")

    model: str
    stream: bool | None = False
    stream_options: StreamOptions | None = None
    max_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    n: int | None = None
    best_of: int | None = None  # (chat: vLLM's extension)
    prompt_logprobs: int | None = None  # vLLM's extension
    stop: str | list[str] | None = None
    seed: int | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    logit_bias: dict[str, float] | None = None
    # vLLM's sampling extensions (sent by the openai package through ``extra_body``)
    repetition_penalty: float | None = None
    min_p: float | None = None
    min_tokens: int | None = None
    ignore_eos: bool | None = None
    stop_token_ids: list[int] | None = None
    bad_words: list[str] | None = None
    # structured output (vLLM's guided_* fields through extra_body; OpenAI's response_format)
    response_format: Any = None
    guided_json: Any = None
    guided_regex: Any = None
    guided_choice: Any = None
    guided_grammar: Any = None
    structured_outputs: Any = None
    # ryzanstein extensions
    top_k: int | None = None
    priority: int | None = None
    timeout_s: float | None = None


class CompletionBody(_Common):
    prompt: str | list[str] | list[int] | list[list[int]]
    echo: bool | None = None
    suffix: str | None = None
    logprobs: int | None = None


class ChatBody(_Common):
    messages: list[Any]
    max_completion_tokens: int | None = None
    logprobs: bool | None = None
    top_logprobs: int | None = None
    tools: list[Any] | None = None
    tool_choice: Any = None
    functions: list[Any] | None = None
    function_call: Any = None


@dataclass
class Generation:
    """One validated OpenAI request, as the gateway will send it."""

    kind: Kind
    model: str
    stream: bool
    include_usage: bool
    prompt: str | None = None  # completions: the text; chat: filled in once the template is rendered
    prompt_ids: list[int] | None = None
    messages: list[dict[str, Any]] = field(default_factory=list)  # chat only
    options: GenerationOptions = field(default_factory=lambda: GenerationOptions())
    echo: bool = False  # completions: the prompt comes first in each choice's text (and logprobs)
    echo_text: str = ""  # the prompt's text, for echo (filled in by the gateway for token-id prompts)
    n: int = 1  # choices in the response
    prompt_logprobs: bool = False  # vLLM's prompt_logprobs field was sent: the response shows them


def _validation_error(exc: ValidationError) -> ApiError:
    err = exc.errors()[0]
    param = str(err["loc"][0]) if err["loc"] else None
    return ApiError("invalid_request", f"field '{param or 'body'}': {err['msg']}", param)


def _refuse(param: str, why: str) -> ApiError:
    return ApiError("invalid_request", f"field '{param}': {why}", param)


# What the gateway refuses by name when set to a value that would change the output: the protocol's
# list (vLLM's fields, sent through ``extra_body``) and OpenAI's and vLLM's chat-only fields.
# ``logprobs`` and ``top_logprobs`` are checked with the endpoints' own shapes.
_OFF, _ON = frozenset({"0", "false"}), frozenset({"1", "true"})
UNHONOURED_PARAMS: dict[str, frozenset[str] | None] = {
    **{k: v for k, v in UNHONOURED_FIELDS.items() if k not in ("logprobs", "top_logprobs")},
    "audio": None,
    "prediction": None,
    "web_search_options": None,
    "modalities": frozenset({'["text"]'}),
    "echo": _OFF,
    "add_generation_prompt": _ON,
    "continue_final_message": _OFF,
    "chat_template": None,
    "chat_template_kwargs": frozenset({"{}"}),
    "documents": None,
    "mm_processor_kwargs": None,
    "return_tokens_as_token_ids": _OFF,
    # vLLM's: chat prompts get only the special tokens their template writes (its default, false)
    "add_special_tokens": _OFF,
}


# Completions honour ``echo`` (the prompt in front of each choice's text, and its logprobs), and
# their prompts get the tokenizer's special tokens (a BOS), vLLM's default for them.
_COMPLETION_UNHONOURED = {**{k: v for k, v in UNHONOURED_PARAMS.items() if k != "echo"}, "add_special_tokens": _ON}


def _check_unhonoured(raw: dict[str, Any], table: dict[str, frozenset[str] | None] = UNHONOURED_PARAMS) -> None:
    if (name := unhonoured_field(raw, table)) is not None:
        raise _refuse(name, "not supported by this server; leave it unset")


def _check_unsupported(body: _Common) -> None:
    if body.stream_options is not None and not body.stream:
        raise _refuse("stream_options", "only allowed when stream is true")
    if body.stream_options is not None and body.stream_options.continuous_usage_stats:
        raise _refuse("stream_options.continuous_usage_stats",
                      "not supported by this server (usage comes in the last chunk with include_usage)")
    n = body.n if body.n is not None else 1
    if not 1 <= n <= MAX_N:
        raise _refuse("n", f"must be in 1..{MAX_N}")
    if body.best_of is not None and not n <= body.best_of <= MAX_N:
        raise _refuse("best_of", f"must be in n..{MAX_N} (n is {n})")
    if body.best_of is not None and body.stream and body.best_of > n:
        raise _refuse("best_of", "must equal n when streaming")


# Sampling controls, passed on as the protocol fields of the same names when set.
Control = Literal["presence_penalty", "frequency_penalty", "repetition_penalty", "min_p", "min_tokens", "ignore_eos",
                  "stop_token_ids", "logit_bias", "bad_words"]
CONTROLS: tuple[Control, ...] = get_args(Control)
# The same for several completions and prompt logprobs (vLLM's extension).
Passed = Literal[Control, "n", "best_of", "prompt_logprobs"]
PASSED: tuple[Passed, ...] = (*CONTROLS, "n", "best_of", "prompt_logprobs")


def _options(body: _Common, max_tokens: int | None) -> GenerationOptions:
    options: GenerationOptions = {
        "max_tokens": max_tokens,
        "temperature": body.temperature,
        "top_p": body.top_p,
        "top_k": body.top_k,
        "seed": body.seed,
        "stop": body.stop,
        "priority": body.priority,
        "timeout_s": body.timeout_s,
    }
    for name in PASSED:
        if (value := getattr(body, name)) is not None:
            options[name] = value
    if isinstance(body.stop, list) and not body.stop:
        options["stop"] = None
    if (structured := _structured(body)) is not None:
        options.update(structured.to_fields())  # type: ignore[typeddict-item]
    return options


def _structured(body: _Common) -> StructuredOutput | None:
    """The request's structured-output constraint, checked as the protocol checks it (a 400 naming
    the field); sent on as the one protocol field that reads back as it."""
    raw = {name: getattr(body, name) for name in ("response_format", "guided_json", "guided_regex", "guided_choice",
                                                  "guided_grammar", "structured_outputs")}
    try:
        return parse_structured({k: v for k, v in raw.items() if v is not None})
    except InvalidRequest as exc:
        param = next((k for k in raw if f"'{k}" in str(exc)), None)
        raise ApiError("invalid_request", str(exc), param) from None


def parse_json(raw: bytes) -> dict[str, Any]:
    try:
        body = json.loads(raw)
    except ValueError as exc:
        raise ApiError("invalid_request", f"the request body is not valid JSON: {exc}") from None
    if not isinstance(body, dict):
        raise ApiError("invalid_request", "the request body must be a JSON object")
    return body


def parse_completion(raw: dict[str, Any]) -> Generation:
    """A ``/v1/completions`` body; ApiError (400) for what is invalid or unsupported."""
    try:
        body = CompletionBody.model_validate(raw)
    except ValidationError as exc:
        raise _validation_error(exc) from None
    _check_unsupported(body)
    _check_unhonoured(raw, _COMPLETION_UNHONOURED)
    if body.echo and body.stream and body.logprobs is not None:
        raise _refuse("echo", "not supported with stream and logprobs together")
    if body.suffix:
        raise _refuse("suffix", "not supported")
    if body.logprobs is not None and not 0 <= body.logprobs <= MAX_TOP_LOGPROBS:
        raise _refuse("logprobs", f"must be in 0..{MAX_TOP_LOGPROBS}")
    prompt: str | None = None
    prompt_ids: list[int] | None = None
    value = body.prompt
    if isinstance(value, list) and value and not isinstance(value[0], int):
        if len(value) != 1:
            raise _refuse("prompt", "only one prompt per request is supported")
        value = value[0]
    if isinstance(value, str):
        prompt = value
    else:
        prompt_ids = [t for t in value if isinstance(t, int)]  # every one: the body's type was validated
    options = _with_logprobs(_options(body, body.max_tokens), body.logprobs is not None, body.logprobs)
    if body.echo and body.logprobs is not None and body.prompt_logprobs is None:
        options["prompt_logprobs"] = body.logprobs  # the echoed prompt's logprobs (OpenAI's echo)
    return Generation(
        kind="completion",
        model=body.model,
        stream=bool(body.stream),
        include_usage=bool(body.stream_options and body.stream_options.include_usage),
        prompt=prompt,
        prompt_ids=prompt_ids,
        options=options,
        echo=bool(body.echo),
        echo_text=prompt or "",
        n=body.n or 1,
        prompt_logprobs=body.prompt_logprobs is not None,
    )


def _with_logprobs(options: GenerationOptions, wanted: bool, top: int | None) -> GenerationOptions:
    if wanted:
        options["logprobs"] = True
        options["top_logprobs"] = top or 0
    elif top:
        raise _refuse("top_logprobs", "needs logprobs set to true")
    return options


def parse_chat(raw: dict[str, Any], *, default_max_tokens: int) -> Generation:
    """A ``/v1/chat/completions`` body; ApiError (400) for what is invalid or unsupported."""
    try:
        body = ChatBody.model_validate(raw)
    except ValidationError as exc:
        raise _validation_error(exc) from None
    _check_unsupported(body)
    _check_unhonoured(raw)
    for name in ("tools", "functions"):
        if getattr(body, name):
            raise _refuse(name, "tool calling is not supported")
    if body.tool_choice not in (None, "none") or body.function_call not in (None, "none"):
        raise _refuse("tool_choice", "tool calling is not supported")
    try:
        messages = normalize_messages(body.messages)
    except InvalidRequest as exc:
        raise ApiError.from_code("invalid_request", str(exc)) from None
    max_tokens = body.max_completion_tokens or body.max_tokens
    options = _with_logprobs(_options(body, max_tokens or default_max_tokens), bool(body.logprobs),
                             body.top_logprobs)
    if max_tokens is None:  # the rest of the context, up to the default (as vLLM's None)
        options["fit_max_tokens"] = True
    return Generation(
        kind="chat",
        model=body.model,
        stream=bool(body.stream),
        include_usage=bool(body.stream_options and body.stream_options.include_usage),
        messages=messages,
        options=options,
        n=body.n or 1,
        prompt_logprobs=body.prompt_logprobs is not None,
    )
