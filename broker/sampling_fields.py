"""A request's sampling fields (vLLM's ``SamplingParams`` names), converted from its raw fields:
max_tokens, temperature, top_p, top_k, seed, stop strings and ids, the sampling controls (penalties,
min_p, min_tokens, ignore_eos, logit_bias, bad_words), structured output, logprobs and several
completions. Raises ``InvalidRequest`` naming the field; the bounds of single values are
``broker.protocol.SamplingParams``'s, the rules across fields are checked here.
"""

from __future__ import annotations

import json
from typing import Any

from broker.errors import InvalidRequest
from broker.fields import as_bool, as_float, as_int, as_strings, as_text, as_token_ids, show
from broker.protocol import (
    LOGIT_BIAS_LIMIT,
    MAX_BAD_WORDS,
    MAX_LOGIT_BIAS,
    MAX_STOP_STRINGS,
    MAX_STOP_TOKEN_IDS,
    UINT64_MAX,
)
from broker.structured import parse_structured


def parse_sampling(raw: dict[str, Any], *, default_max_tokens: int) -> dict[str, Any]:
    """The ``SamplingParams`` fields ``raw`` (a request's fields, names decoded) sets, converted;
    ``max_tokens`` is ``default_max_tokens`` when unset. The rules across fields: ``check_sampling``."""
    sampling: dict[str, Any] = {"max_tokens": default_max_tokens}
    for name, convert in (("max_tokens", as_int), ("temperature", as_float), ("top_p", as_float), ("top_k", as_int)):
        if raw.get(name) is not None:
            sampling[name] = convert(name, raw[name])
    if raw.get("seed") is not None:
        sampling["seed"] = as_int("seed", raw["seed"])
    if raw.get("stop") is not None:
        sampling["stop"] = _stop(raw["stop"])
    if raw.get("stop_token_ids") is not None:
        sampling["stop_token_ids"] = _stop_token_ids(raw["stop_token_ids"])
    sampling.update(_controls(raw))
    return sampling


def check_sampling(sampling: dict[str, Any], *, stream: bool) -> None:
    """The rules across ``parse_sampling``'s fields: ``best_of`` and ``n`` (``stream``: whether the
    request streams), ``min_tokens`` at most ``max_tokens``."""
    _check_choices(sampling, stream=stream)
    if sampling.get("min_tokens", 0) > sampling["max_tokens"] >= 1:
        raise InvalidRequest(f"field 'min_tokens': must be at most max_tokens ({sampling['max_tokens']}), "
                             f"got {sampling['min_tokens']}")


def _stop(value: Any) -> tuple[str, ...]:
    return as_strings("stop", value, limit=MAX_STOP_STRINGS, noun="stop strings", blank_ok=True)


def _stop_token_ids(value: Any) -> tuple[int, ...]:
    ids = as_token_ids(value, "stop_token_ids", empty_ok=True)
    if len(ids) > MAX_STOP_TOKEN_IDS:
        raise InvalidRequest(f"field 'stop_token_ids': at most {MAX_STOP_TOKEN_IDS} ids, got {len(ids)}")
    return ids


def _controls(raw: dict[str, Any]) -> dict[str, Any]:
    """The sampling controls a request sets (penalties, min_p, min_tokens, ignore_eos, logit_bias,
    bad_words), converted; their bounds are checked by ``SamplingParams``."""
    out: dict[str, Any] = {}
    for name in ("presence_penalty", "frequency_penalty", "repetition_penalty", "min_p"):
        if raw.get(name) is not None:
            out[name] = as_float(name, raw[name])
    if raw.get("min_tokens") is not None:
        out["min_tokens"] = as_int("min_tokens", raw["min_tokens"])
    if raw.get("ignore_eos") is not None:
        out["ignore_eos"] = as_bool("ignore_eos", raw["ignore_eos"])
    if raw.get("logit_bias") is not None:
        out["logit_bias"] = _logit_bias(raw["logit_bias"])
    if raw.get("bad_words") is not None:
        out["bad_words"] = _bad_words(raw["bad_words"])
    if raw.get("fit_max_tokens") is not None:
        out["fit_max_tokens"] = as_bool("fit_max_tokens", raw["fit_max_tokens"])
    if (structured := parse_structured(raw)) is not None:
        out["structured"] = structured
    if raw.get("logprobs") is not None:
        out["logprobs"] = as_bool("logprobs", raw["logprobs"])
    if raw.get("top_logprobs") is not None:
        out["top_logprobs"] = as_int("top_logprobs", raw["top_logprobs"])
        if out["top_logprobs"] > 0 and not out.get("logprobs"):
            raise InvalidRequest("field 'top_logprobs': needs logprobs set to true")
    for name in ("prompt_logprobs", "n", "best_of"):
        if raw.get(name) is not None:
            out[name] = as_int(name, raw[name])
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
        text = as_text("logit_bias", value)
        try:
            items = json.loads(text)
        except (ValueError, RecursionError):
            raise InvalidRequest(f"field 'logit_bias': expected a JSON object, got {show(text)}") from None
        if not isinstance(items, dict):
            raise InvalidRequest(f"field 'logit_bias': expected a JSON object, got {type(items).__name__}")
    if len(items) > MAX_LOGIT_BIAS:
        raise InvalidRequest(f"field 'logit_bias': at most {MAX_LOGIT_BIAS} entries, got {len(items)}")
    out: dict[int, float] = {}
    for key, bias in items.items():
        token = as_int("logit_bias", key)
        if token < 0 or token > UINT64_MAX:
            raise InvalidRequest(f"field 'logit_bias': token id {token} is out of range")
        number = as_float("logit_bias", bias)
        if abs(number) > LOGIT_BIAS_LIMIT:
            raise InvalidRequest(f"field 'logit_bias': bias {number} for token {token} is outside "
                                 f"[-{LOGIT_BIAS_LIMIT:g}, {LOGIT_BIAS_LIMIT:g}]")
        out[token] = number
    return tuple(sorted(out.items()))


def _bad_words(value: Any) -> tuple[str, ...]:
    return as_strings("bad_words", value, limit=MAX_BAD_WORDS, noun="words", blank_ok=False)
