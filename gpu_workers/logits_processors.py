"""What a request's sampling controls do to its row of logits before the sampler picks a token.

The meanings are vLLM's (``vllm/v1/sample/sampler.py``, ``ops/penalties.py``, ``ops/bad_words.py``,
``logits_processor/builtin.py``), in vLLM's order:

1. ``logit_bias``: each listed token's bias is added to its logit.
2. ``bad_words`` and ``min_tokens``: a bad word's last token gets -inf when the tokens generated so
   far end with the word's other tokens; while fewer than ``min_tokens`` tokens are generated, the
   stop ids (EOS, unless ``ignore_eos``) get -inf.
3. Penalties, over the tokens seen so far: ``repetition_penalty`` on every token of the prompt or
   the output (a positive logit is divided by it, a negative one multiplied: Keskar et al. 2019, as
   transformers' ``RepetitionPenaltyLogitsProcessor``), then ``frequency_penalty`` times the
   token's count in the output and ``presence_penalty`` once for a token in the output are
   subtracted (OpenAI's definition).

Temperature, ``min_p``, top-k and top-p follow in gpu_workers.sampler. Every step is one batched
tensor operation over the rows that use it; Python loops run over a request's bias entries, bad
words and tokens, never over the vocabulary.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from gpu_workers.engine import Tokenizer
from gpu_workers.sampling_params import SamplingParams


@dataclass(frozen=True, slots=True)
class RowContext:
    """One row's tokens so far, and what was prepared for its request at admission."""

    token_ids: Sequence[int]  # prompt + generated so far (not copied: read during the call only)
    num_prompt_tokens: int
    stop_ids: frozenset[int] = frozenset()  # masked while fewer than min_tokens tokens are generated
    bad_words_ids: tuple[tuple[int, ...], ...] = ()  # from bad_words_token_ids()

    @property
    def num_generated(self) -> int:
        return len(self.token_ids) - self.num_prompt_tokens


def bad_words_token_ids(words: Sequence[str], tokenizer: Tokenizer) -> tuple[tuple[int, ...], ...]:
    """The token sequences ``bad_words`` forbid, as vLLM's ``SamplingParams.update_from_tokenizer``
    builds them: each word as written (leading spaces stripped), and with one leading space where
    that encodes to the same number of tokens starting with another token (the word in mid-text)."""
    out: list[tuple[int, ...]] = []
    for word in words:
        plain = tuple(tokenizer.encode(word.lstrip(), add_special_tokens=False))
        if plain:
            out.append(plain)
        spaced = tuple(tokenizer.encode(" " + word.lstrip(), add_special_tokens=False))
        if spaced and (not plain or (spaced[0] != plain[0] and len(spaced) == len(plain))):
            out.append(spaced)
    return tuple(out)


def is_controlled(params: SamplingParams, context: RowContext) -> bool:
    """Whether ``apply_controls`` changes anything in this row."""
    return bool(
        params.logit_bias
        or context.bad_words_ids
        or (context.stop_ids and context.num_generated < params.min_tokens)
        or _penalized(params)
    )


def _penalized(params: SamplingParams) -> bool:
    return params.repetition_penalty != 1.0 or params.frequency_penalty != 0.0 or params.presence_penalty != 0.0


def apply_controls(x: torch.Tensor, params: Sequence[SamplingParams], contexts: Sequence[RowContext]) -> None:
    """Apply each row's logit bias, bad words, min_tokens and penalties to ``x`` (``[N, V]``
    float32, one row per request), in place."""
    vocab, device = x.shape[-1], x.device
    rows: list[int] = []
    ids: list[int] = []
    biases: list[float] = []
    for i, p in enumerate(params):
        for token, bias in p.logit_bias:
            if token < vocab:  # the group refuses larger ids; never index past the row
                rows.append(i)
                ids.append(token)
                biases.append(bias)
    if rows:
        index = (torch.tensor(rows, device=device), torch.tensor(ids, device=device))
        x.index_put_(index, torch.tensor(biases, device=device), accumulate=True)

    rows, ids = [], []
    for i, (p, ctx) in enumerate(zip(params, contexts)):
        generated = ctx.num_generated
        if generated < p.min_tokens:
            masked = [t for t in ctx.stop_ids if t < vocab]
            rows += [i] * len(masked)
            ids += masked
        for word in ctx.bad_words_ids:
            before = len(word) - 1  # the tokens that must already be the output's last ones
            if before > generated or word[-1] >= vocab:
                continue
            if before == 0 or all(a == b for a, b in zip(ctx.token_ids[-before:], word[:-1])):
                rows.append(i)
                ids.append(word[-1])
    if rows:
        x[torch.tensor(rows, device=device), torch.tensor(ids, device=device)] = float("-inf")

    penalized = [i for i, p in enumerate(params) if _penalized(p)]
    if penalized:
        part = x[penalized]  # [R, V], a copy
        _penalize(part, [params[i] for i in penalized], [contexts[i] for i in penalized])
        x[penalized] = part


def _penalize(x: torch.Tensor, params: list[SamplingParams], contexts: list[RowContext]) -> None:
    """vLLM's ``apply_penalties`` on ``x`` (``[R, V]``), in place."""
    vocab, device = x.shape[-1], x.device
    counts = _bincount([c.token_ids[c.num_prompt_tokens:] for c in contexts], vocab, device)  # [R, V]
    in_output = counts > 0
    repetition = torch.tensor([p.repetition_penalty for p in params], device=device).unsqueeze(-1)  # [R, 1]
    if bool((repetition != 1.0).any()):
        in_prompt = _bincount([c.token_ids[: c.num_prompt_tokens] for c in contexts], vocab, device) > 0
        factor = torch.where(in_prompt | in_output, repetition, 1.0)  # [R, V]
        x.copy_(torch.where(x > 0, x / factor, x * factor))
    frequency = torch.tensor([p.frequency_penalty for p in params], device=device).unsqueeze(-1)
    presence = torch.tensor([p.presence_penalty for p in params], device=device).unsqueeze(-1)
    x -= frequency * counts + presence * in_output


def _bincount(rows: list[Sequence[int]], vocab: int, device: torch.device) -> torch.Tensor:
    """``[R, V]`` float32: how often each token id occurs in each row's tokens."""
    width = max(1, max(len(r) for r in rows))
    ids = torch.full((len(rows), width), vocab, dtype=torch.long)  # padding counts in a column dropped below
    for r, tokens in enumerate(rows):
        if tokens:
            ids[r, : len(tokens)] = torch.tensor(tokens, dtype=torch.long).clamp_(0, vocab)
    ids = ids.to(device)
    counts = torch.zeros(len(rows), vocab + 1, device=device)
    counts.scatter_add_(1, ids, torch.ones_like(ids, dtype=counts.dtype))
    return counts[:, :vocab]
