"""The OpenAI response shapes the gateway writes for one request: the full completion or chat
completion, stream chunks and the usage chunk (``Responder``), logprobs in OpenAI's and vLLM's
shapes, and server-sent events (``sse``, ``SSE_DONE``). The request shapes: producer.gateway.schema.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from producer.gateway.schema import Kind
from producer.request import Completion


def usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


@dataclass(frozen=True)
class Responder:
    """Builds the response objects of one request (same id, creation time and model throughout)."""

    kind: Kind
    response_id: str
    created: int
    model: str

    def _envelope(self, obj: str, choices: list[dict[str, Any]], **extra: Any) -> dict[str, Any]:
        return {"id": self.response_id, "object": obj, "created": self.created, "model": self.model,
                "system_fingerprint": None, "choices": choices, **extra}

    def logprobs(self, entries: list[dict[str, Any] | None] | None, *, text_offset: int = 0) -> dict[str, Any] | None:
        """OpenAI's ``logprobs`` object of a choice for these tokens' entries (``Completion.logprobs``);
        entries that are None (tokens generated before the request moved between groups) are left out."""
        if entries is None:
            return None
        known = [e for e in entries if e is not None]
        if self.kind == "chat":
            return {"content": [{**_chat_token(e), "top_logprobs": [_chat_token(t) for t in e["top_logprobs"]]}
                                for e in known]}
        offsets = []
        for e in known:
            offsets.append(text_offset)
            text_offset += len(e["text"])
        # The legacy shape's top_logprobs map text to logprob, and hold the sampled token too (as vLLM's).
        top = [{**{t["text"]: t["logprob"] for t in reversed(e["top_logprobs"])}, e["text"]: e["logprob"]}
               for e in known]
        return {"tokens": [e["text"] for e in known], "token_logprobs": [e["logprob"] for e in known],
                "top_logprobs": top, "text_offset": offsets}

    def full(self, done: Completion, *, echo: str | None = None,
             prompt_entries: list[dict[str, Any] | None] | None = None,
             prompt_logprobs: bool = False) -> dict[str, Any]:
        """The non-streaming response: a choice per completion (``n``). ``echo``: the prompt's
        text, put in front of each completion's text (completions' ``echo``), with the prompt's
        logprob entries ``prompt_entries`` in front of its logprobs; ``prompt_logprobs``: also
        give those entries in vLLM's ``prompt_logprobs`` shape."""
        choices = []
        for c in done.all_choices():
            logprobs = self.logprobs(c.logprobs)
            if self.kind == "completion":
                if echo is not None and logprobs is not None and prompt_entries is not None:
                    logprobs = self._echoed_logprobs(echo, prompt_entries, c.logprobs or [])
                choice: dict[str, Any] = {"index": c.index, "text": (echo or "") + c.text, "logprobs": logprobs,
                                          "finish_reason": c.finish_reason}
                if prompt_logprobs:
                    choice["prompt_logprobs"] = vllm_prompt_logprobs(prompt_entries)
            else:
                choice = {"index": c.index, "message": {"role": "assistant", "content": c.text},
                          "logprobs": logprobs, "finish_reason": c.finish_reason}
            choices.append(choice)
        obj = "text_completion" if self.kind == "completion" else "chat.completion"
        extra: dict[str, Any] = {}
        if prompt_logprobs and self.kind == "chat":
            extra["prompt_logprobs"] = vllm_prompt_logprobs(prompt_entries)
        return self._envelope(obj, choices, usage=usage(done.prompt_tokens, done.completion_tokens), **extra)

    def _echoed_logprobs(self, echo: str, prompt: list[dict[str, Any] | None],
                         generated: list[dict[str, Any] | None]) -> dict[str, Any]:
        """Completions' legacy logprobs of an echoed prompt and its completion: the prompt's first
        token has none (null, as OpenAI's); its text is what the others' texts leave of ``echo``."""
        tail = self.logprobs(generated) or {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
        rest = "".join(e["text"] for e in prompt if e is not None)
        first = echo[: len(echo) - len(rest)] if echo.endswith(rest) else ""
        head: dict[str, list[Any]] = {"tokens": [first], "token_logprobs": [None], "top_logprobs": [None],
                                      "text_offset": [0]}
        offset = len(first)
        for e in prompt:
            if e is None:  # the first prompt token, done above
                continue
            head["tokens"].append(e["text"])
            head["token_logprobs"].append(e["logprob"])
            head["top_logprobs"].append({**{t["text"]: t["logprob"] for t in reversed(e["top_logprobs"])},
                                         e["text"]: e["logprob"]})
            head["text_offset"].append(offset)
            offset += len(e["text"])
        tail["text_offset"] = [o + offset for o in tail["text_offset"]]
        return {k: head[k] + tail[k] for k in head}

    def chunk(self, text: str | None, *, finish_reason: str | None = None, first: bool = False,
              with_usage_field: bool = False, logprobs: dict[str, Any] | None = None,
              index: int = 0, **extra: Any) -> dict[str, Any]:
        """One streamed chunk of choice ``index``: a text delta and/or the finish reason (``first``:
        chat's role delta), with the ``logprobs`` object of its tokens (``Responder.logprobs``);
        ``extra``: more fields of the choice."""
        if self.kind == "completion":
            choice: dict[str, Any] = {"index": index, "text": text or "", "logprobs": logprobs,
                                      "finish_reason": finish_reason, **extra}
            obj = "text_completion"
        else:
            delta: dict[str, Any] = {}
            if first:
                delta["role"] = "assistant"
            if text is not None:
                delta["content"] = text
            choice = {"index": index, "delta": delta, "logprobs": logprobs, "finish_reason": finish_reason, **extra}
            obj = "chat.completion.chunk"
        usage_field = {"usage": None} if with_usage_field else {}
        return self._envelope(obj, [choice], **usage_field)

    def usage_chunk(self, done: Completion) -> dict[str, Any]:
        """The last chunk when ``stream_options.include_usage``: no choices, the usage."""
        obj = "text_completion" if self.kind == "completion" else "chat.completion.chunk"
        return self._envelope(obj, [], usage=usage(done.prompt_tokens, done.completion_tokens))


def vllm_prompt_logprobs(entries: list[dict[str, Any] | None] | None) -> list[dict[str, Any] | None] | None:
    """Prompt logprob entries (PROTOCOL.md) in vLLM's ``prompt_logprobs`` shape: per prompt token
    None (the first) or ``{"<token id>": {"logprob", "rank", "decoded_token"}}`` holding the prompt
    token and its likeliest alternatives; ``rank`` is 1 for the likeliest, None where not known (the
    prompt token when it is not among the alternatives)."""
    if entries is None:
        return None
    out: list[dict[str, Any] | None] = []
    for e in entries:
        if e is None:
            out.append(None)
            continue
        ranked = {t["token_id"]: (rank, t) for rank, t in enumerate(e["top_logprobs"], start=1)}
        item = {str(e["token_id"]): {"logprob": e["logprob"], "rank": ranked.get(e["token_id"], (None,))[0],
                                     "decoded_token": e["text"]}}
        for token_id, (rank, t) in ranked.items():
            item.setdefault(str(token_id), {"logprob": t["logprob"], "rank": rank, "decoded_token": t["text"]})
        out.append(item)
    return out


def _chat_token(entry: dict[str, Any]) -> dict[str, Any]:
    return {"token": entry["text"], "logprob": entry["logprob"], "bytes": list(entry["text"].encode("utf-8"))}


def sse(data: dict[str, Any] | str) -> bytes:
    """One server-sent event: ``data: <json>`` and a blank line."""
    text = data if isinstance(data, str) else json.dumps(data, ensure_ascii=False, separators=(",", ":"))
    return f"data: {text}\n\n".encode()


SSE_DONE = sse("[DONE]")
