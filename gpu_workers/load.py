"""What a worker group measures about itself for its heartbeat: recent token rate, step latency.

Plain Python with time passed in, so that it is unit-tested without sleeping.
"""

from __future__ import annotations

from dataclasses import dataclass

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
