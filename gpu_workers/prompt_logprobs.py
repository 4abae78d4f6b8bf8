"""Prompt logprobs (vLLM's ``prompt_logprobs``): how likely the model found each prompt token.

The logits of position ``p`` predict token ``p + 1``, so a prompt of ``P`` tokens has ``P - 1``
entries (the first token has none). They are the raw model's: the log-softmax of its logits, before
any sampling control or temperature (vLLM's ``raw_logprobs``), so they equal transformers'
``log_softmax(model(prompt).logits)``. A prefix-cache hit would skip computing the logits of the
prompt it covers, so a request that asks for them never takes blocks from the prefix cache
(``Sequence.skip_prefix_cache``).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from gpu_workers.engine import TokenLogprobs


@dataclass(slots=True)
class PromptLogprobs:
    """One request's prompt logprobs as its prefill computes them, chunk after chunk."""

    prompt_ids: list[int]
    top: int  # likeliest alternatives per token
    # entry p + 1 comes from position p's logits; entry 0 is None for good
    entries: list[TokenLogprobs | None] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.entries = [None] * len(self.prompt_ids)

    def wants(self, start: int) -> bool:
        """Whether a chunk starting at position ``start`` reaches positions whose logits count."""
        return start < len(self.prompt_ids) - 1

    def add(self, start: int, logits: torch.Tensor) -> None:
        """Take the logits ``[n, V]`` of the chunk of positions ``start .. start + n - 1``."""
        end = min(start + logits.shape[0], len(self.prompt_ids) - 1)  # positions that predict a prompt token
        if end <= start:
            return
        lp = torch.log_softmax(logits[: end - start].float(), dim=-1)  # [m, V]
        targets = torch.tensor(self.prompt_ids[start + 1 : end + 1], device=lp.device)
        chosen = lp.gather(-1, targets.unsqueeze(-1)).squeeze(-1).tolist()
        values: list[list[float]] = [[] for _ in chosen]
        ids: list[list[int]] = [[] for _ in chosen]
        if self.top:
            best = lp.topk(min(self.top, lp.shape[-1]), dim=-1)
            values, ids = best.values.tolist(), best.indices.tolist()
        for j, logprob in enumerate(chosen):
            self.entries[start + 1 + j] = TokenLogprobs(logprob, tuple(zip(ids[j], values[j])))

    @property
    def complete(self) -> bool:
        return all(e is not None for e in self.entries[1:])
