"""Result events -> stream fields: token events while streaming, one final event (done or error).
What each field means: docs/PROTOCOL.md."""

from __future__ import annotations

import json
import math
from typing import Any

from broker.protocol import FinishReason


def token_event(request_id: str, index: int, token_id: int, text: str,
                logprobs: dict[str, Any] | None = None, *, choice: int | None = None,
                finish_reason: str | None = None) -> dict[str, str]:
    """``logprobs``: this token's entry of the done event's ``logprobs`` (``token_logprobs``), or
    None; sent as ``logprob`` (the number alone, for reading by eye) and ``logprobs`` (the entry).
    ``choice``: the completion it belongs to, for requests with several (n > 1; ``index`` counts
    within that completion); ``finish_reason``: set on the token that ends its completion (n > 1)."""
    event = {"id": request_id, "event": "token", "index": str(index), "token_id": str(token_id), "text": text}
    if logprobs is not None:
        event["logprob"] = repr(logprobs["logprob"])
        event["logprobs"] = _json(logprobs)
    if choice is not None:
        event["choice"] = str(choice)
    if finish_reason is not None:
        event["finish_reason"] = finish_reason
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
    choices: list[dict[str, Any]] | None = None,
    prompt_logprobs: list[dict[str, Any] | None] | None = None,
) -> dict[str, str]:
    """``logprobs``: one ``token_logprobs`` entry per token id (None for a token generated before
    the request moved to this group), or None when the request did not ask for them. ``served``:
    ``model``, ``group`` and the timings ``queue_s``, ``ttft_s``, ``total_s`` (seconds as text).
    ``choices``: for a request with several completions, each as ``choice_entry`` makes it, the
    first also given by ``text``...``logprobs``; ``completion_tokens`` then counts all of them.
    ``prompt_logprobs``: one entry per prompt token (None for the first), when asked for."""
    extra = {"logprobs": _json(logprobs)} if logprobs is not None else {}
    if prompt_logprobs is not None:
        extra["prompt_logprobs"] = _json(prompt_logprobs)
    completion_tokens = len(token_ids)
    if choices is not None:
        extra["choices"] = _json(choices)
        completion_tokens = sum(len(c["token_ids"]) for c in choices)
    extra.update(served or {})
    return {
        "id": request_id,
        "event": "done",
        "text": text,
        "token_ids": json.dumps(token_ids, separators=(",", ":")),
        "finish_reason": finish_reason,
        "prompt_tokens": str(prompt_tokens),
        "completion_tokens": str(completion_tokens),
        **extra,
    }


def choice_entry(index: int, *, text: str, token_ids: list[int], finish_reason: str,
                 logprobs: list[dict[str, Any] | None] | None = None,
                 cumulative_logprob: float | None = None) -> dict[str, Any]:
    """One completion of a done event's ``choices``: ``{"index", "text", "token_ids",
    "finish_reason"}``, with ``logprobs`` when asked for and ``cumulative_logprob`` when known (the
    sum of its tokens' logprobs: what ``best_of`` ranks by)."""
    entry: dict[str, Any] = {"index": index, "text": text, "token_ids": token_ids, "finish_reason": finish_reason}
    if logprobs is not None:
        entry["logprobs"] = logprobs
    if cumulative_logprob is not None:
        entry["cumulative_logprob"] = cumulative_logprob if math.isfinite(cumulative_logprob) else LOGPROB_FLOOR
    return entry


def error_event(request_id: str, code: str, message: str) -> dict[str, str]:
    return {"id": request_id, "event": "error", "code": code, "message": message}


FINAL_EVENTS = frozenset({"done", "error"})
