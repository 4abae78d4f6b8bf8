"""What a worker group reports about itself in its heartbeat: recent token rate, step latency, and
the requests and tokens it holds.

Plain Python with time passed in, so that it is unit-tested without sleeping.
"""

from __future__ import annotations

import os
import socket
from dataclasses import dataclass

from broker.registry import GroupLoad
from gpu_workers.engine import Engine
from gpu_workers.holding import Holding

LATENCY_ALPHA = 0.2  # weight of the newest step in the latency EWMA: about the last 5-10 steps count


@dataclass(slots=True)
class LoadMeter:
    """Tokens generated since the last heartbeat, and an EWMA of the engine's step time.

    The step time is the time between two tokens of one request (inter-token latency): it grows with
    the batch the engine runs, so routing reads it as how slow a new request would be served there.
    A window without a step (idle) forgets it: an idle group would serve a new request at once, and a
    stale value (a step that took long because the process was stopped) must not keep work away.
    """

    window_start: float
    tokens: int = 0
    latency_ewma_s: float = 0.0
    steps: int = 0
    window_steps: int = 0

    def step(self, seconds: float, tokens: int) -> None:
        """One engine step took ``seconds`` and produced ``tokens`` tokens."""
        self.tokens += tokens
        self.steps += 1
        self.window_steps += 1
        if self.steps == 1:
            self.latency_ewma_s = seconds
        else:
            self.latency_ewma_s += LATENCY_ALPHA * (seconds - self.latency_ewma_s)

    def tokens_per_s(self, now: float) -> float:
        """The rate over the window since the last ``reset``, which starts a new window."""
        elapsed = now - self.window_start
        return self.tokens / elapsed if elapsed > 0 else 0.0

    def reset(self, now: float) -> None:
        if self.window_steps == 0:
            self.latency_ewma_s = 0.0
            self.steps = 0
        self.window_start = now
        self.tokens = 0
        self.window_steps = 0


def group_load(name: str, engine: Engine, holding: Holding, meter: LoadMeter, *, now: float, state: str,
               queue_depth: int, completed: int, fenced: int, metrics_port: int | None = None,
               served_models: list[str] | None = None, weights: str = "", chat_template: str = "",
               tokenizer: str = "") -> GroupLoad:
    """One heartbeat's worth: identity and limits, engine stats, what is held, the meter's readings;
    ``chat_template``, ``tokenizer``: the digests of the engine's template and tokenizer as published
    (broker.chat, broker.tokenizers)."""
    stats = engine.stats()
    info = engine.info
    queued_tokens, running_tokens = holding.tokens()
    return GroupLoad(
        name=name,
        tp=info.tp,
        model=info.model,
        kv_dtype=info.kv_dtype,
        kv_capacity_tokens=stats.kv_capacity_tokens,
        kv_used_tokens=stats.kv_used_tokens,
        running=stats.running,
        waiting=stats.waiting,
        queue_depth=queue_depth,
        leader_pid=os.getpid(),
        host=socket.gethostname(),
        max_context=info.max_context,
        vocab_size=info.vocab_size,
        state=state,
        completed=completed,
        tokens_per_s=round(meter.tokens_per_s(now), 1),
        queued_tokens=queued_tokens,
        running_tokens=running_tokens,
        kv_utilization=round(stats.kv_used_tokens / stats.kv_capacity_tokens, 4) if stats.kv_capacity_tokens else 0.0,
        latency_ewma_ms=round(meter.latency_ewma_s * 1000, 3),
        fenced=fenced,
        metrics_port=metrics_port,
        rank_weight_bytes=list(info.rank_weight_bytes),
        rank_kv_bytes=list(info.rank_kv_bytes),
        rank_hosts=list(info.rank_hosts),
        served_models=list(served_models or [info.model]),
        weights=weights,
        chat_template=chat_template,
        bos_token=info.bos_token,
        eos_token=info.eos_token,
        eos_token_ids=sorted(info.eos_token_ids),
        tokenizer=tokenizer,
    )
