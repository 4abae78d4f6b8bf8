"""Turning generated token ids into the protocol's text deltas, with stop strings and limits.

Plain Python, no Redis and no torch: unit-tested in tests/gpu_workers/test_output.py.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from broker.events import token_logprobs
from broker.protocol import SamplingParams
from gpu_workers.engine import Tokenizer, TokenLogprobs
from gpu_workers.tokenizer import IncrementalDetokenizer


@dataclass(frozen=True, slots=True)
class TokenResult:
    index: int  # 0-based position in the completion
    token_id: int
    text: str  # the text this token makes visible (may be "", or carry held-back text)
    finish_reason: str | None  # stop | length when this token ends the request
    logprobs: dict[str, Any] | None = None  # broker.events.token_logprobs, for requests that asked


class OutputState:
    """The completion of one request as it grows, one token at a time.

    Text that could be the start of a stop string is held back until it is resolved, so a client
    never sees part of a stop string; the joined deltas always equal the final ``text``.
    """

    def __init__(
        self,
        *,
        sampling: SamplingParams,
        prompt_ids: list[int],
        tokenizer: Tokenizer,
        eos_token_ids: frozenset[int],
        max_context: int,
    ) -> None:
        self.sampling = sampling
        self.prompt_len = len(prompt_ids)
        self.token_ids: list[int] = []
        self.text = ""
        self.finish_reason: str | None = None
        self._emitted = 0
        # the request's own end tokens too; ignore_eos leaves those, as vLLM's does
        self._eos = (frozenset() if sampling.ignore_eos else eos_token_ids) | frozenset(sampling.stop_token_ids)
        self._max_context = max_context
        self._stops = sampling.stop
        self._longest_stop = max((len(s) for s in self._stops), default=0)
        self._detok = IncrementalDetokenizer(tokenizer, prompt_ids)
        self._tokenizer = tokenizer
        # One entry per token id when the request asked for logprobs (None for tokens replayed from
        # another group, whose logprobs are not known here); None otherwise.
        self.logprobs: list[dict[str, Any] | None] | None = [] if sampling.logprobs else None
        # The sum of the tokens' logprobs while the engine reports every one (best_of ranks by it).
        self.cumulative_logprob: float | None = 0.0

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None

    def push(self, token_id: int, *, engine_finish: str | None = None,
             logprobs: TokenLogprobs | None = None) -> TokenResult:
        """Add one generated token (with its logprobs, if the engine computed them); returns its
        event and whether it ends the request."""
        assert self.finish_reason is None, "token after the end of a completion"
        index = len(self.token_ids)
        self.token_ids.append(token_id)
        rendered = None
        if self.cumulative_logprob is not None:
            self.cumulative_logprob = None if logprobs is None else self.cumulative_logprob + logprobs.logprob
        if self.logprobs is not None:
            rendered = self._render(token_id, logprobs) if logprobs is not None else None
            self.logprobs.append(rendered)
        searched_from = max(0, len(self.text) - self._longest_stop + 1)
        ends_on_it = token_id in self._eos
        if not ends_on_it:  # an EOS or stop id that ends the completion is kept out of its text (vLLM's rule)
            self.text += self._detok.push(token_id)

        finish = None
        if ends_on_it or engine_finish is not None:
            finish = engine_finish or "stop"
        elif (len(self.token_ids) >= self.sampling.max_tokens
              or self.prompt_len + len(self.token_ids) >= self._max_context):
            finish = "length"
        if finish is not None:
            self.text += self._detok.flush()
        # vLLM's rule: stop strings count only from min_tokens on (the stop ids are masked until then)
        if (self._stops and len(self.token_ids) > self.sampling.min_tokens
                and (cut := self._find_stop(searched_from)) is not None):
            self.text = self.text[:cut]
            finish = "stop"

        visible = len(self.text) if finish is not None else len(self.text) - self._held_back()
        delta = self.text[self._emitted : visible] if visible > self._emitted else ""
        self._emitted = max(self._emitted, visible)
        self.finish_reason = finish
        return TokenResult(index=index, token_id=token_id, text=delta, finish_reason=finish, logprobs=rendered)

    def _render(self, token_id: int, logprobs: TokenLogprobs) -> dict[str, Any]:
        return render_logprobs(self._tokenizer, token_id, logprobs)

    def end(self, finish_reason: str) -> None:
        """End a completion from outside (the request was cancelled): its text as it stands."""
        if self.finish_reason is None:
            self.text += self._detok.flush()
            self.finish_reason = finish_reason

    def _find_stop(self, start: int) -> int | None:
        positions = [p for s in self._stops if (p := self.text.find(s, start)) >= 0]
        return min(positions) if positions else None

    def _held_back(self) -> int:
        """Length of the longest tail of ``text`` that is a proper prefix of a stop string."""
        for size in range(min(self._longest_stop - 1, len(self.text)), 0, -1):
            tail = self.text[-size:]
            if any(s.startswith(tail) for s in self._stops):
                return size
        return 0


def render_logprobs(tokenizer: Tokenizer, token_id: int, logprobs: TokenLogprobs) -> dict[str, Any]:
    """A token's logprobs as events carry them; each token's own text is ``decode([id])``, which
    may be part of a character."""
    top = [(t, tokenizer.decode([t]), lp) for t, lp in logprobs.top]
    return token_logprobs(token_id, tokenizer.decode([token_id]), logprobs.logprob, top)


def render_prompt_logprobs(tokenizer: Tokenizer, prompt_ids: list[int],
                           entries: tuple[TokenLogprobs | None, ...]) -> list[dict[str, Any] | None]:
    """The done event's ``prompt_logprobs``: one entry per prompt token (None where the engine has
    none: the first token)."""
    return [render_logprobs(tokenizer, t, e) if e is not None else None for t, e in zip(prompt_ids, entries)]


def ranked_choices(choices: list[OutputState], n: int) -> list[OutputState]:
    """The completions a request returns: all, in order, when it generated ``n``; else (best_of)
    the ``n`` with the highest cumulative logprob, best first."""
    if len(choices) <= n:
        return choices
    def score(o: OutputState) -> float:
        return o.cumulative_logprob if o.cumulative_logprob is not None else float("-inf")
    return sorted(choices, key=score, reverse=True)[:n]
