"""Adaptive batching of ingress reads: wait a little for a bigger batch only when it will come.

A balancer handles whatever one read returned as one batch (one claim pipeline, one dispatch
pipeline), so bigger batches mean fewer round trips per request under load. Waiting for them costs
latency, though, so the batcher waits after a read only under load, when entries queue up while the
balancer works (recent reads returned two or more on average) and the arrival rate promises at least
two more within ``max_wait_s``; then at most ``max_wait_s``, and no longer than the batch needs to
fill. A lone request, or a client sending one request after another, never waits. Time is passed in.
"""

from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass, field

RATE_TAU_S = 0.05  # the arrival rate estimate forgets with this time constant
SIZE_ALPHA = 0.25  # weight of the newest read in the average read size
QUEUED_UP = 2.0  # average read size from which entries are taken to queue up (under load)
MIN_GAIN = 2.0  # entries a wait must be expected to bring, at least


def bucket(size: int) -> str:
    """Histogram bucket of a batch size: 1, 2, 3-4, 5-8, ..., 65-128 (powers of two)."""
    if size <= 2:
        return str(size)
    upper = 1 << (size - 1).bit_length()
    return f"{upper // 2 + 1}-{upper}"


@dataclass(slots=True)
class AdaptiveBatcher:
    max_batch: int
    max_wait_s: float
    rate: float = 0.0  # ingress entries per second, recent
    read_size: float = 0.0  # entries per read, recent average
    last: float | None = None
    sizes: Counter[int] = field(default_factory=Counter)  # batch size -> batches of that size

    def observe(self, n: int, now: float) -> None:
        """A read returned ``n`` entries at ``now``: update the rate (an exponentially decaying count)."""
        if self.last is not None:
            self.rate *= math.exp(-max(0.0, now - self.last) / RATE_TAU_S)
        self.rate += n / RATE_TAU_S
        self.read_size += SIZE_ALPHA * (n - self.read_size)
        self.last = now

    def wait_s(self, n: int) -> float:
        """How long to wait for more after a read of ``n`` entries."""
        if n <= 0 or n >= self.max_batch or self.max_wait_s <= 0 or self.rate <= 0:
            return 0.0
        if self.read_size < QUEUED_UP or self.rate * self.max_wait_s < MIN_GAIN:
            return 0.0  # nothing queues up, or too little is expected: waiting would only add latency
        return min(self.max_wait_s, (self.max_batch - n) / self.rate)

    def record(self, size: int) -> None:
        if size > 0:
            self.sizes[size] += 1

    def histogram(self) -> dict[str, int]:
        """Batches per size bucket, smallest first."""
        out: Counter[str] = Counter()
        for size, count in sorted(self.sizes.items()):
            out[bucket(size)] += count
        return dict(out)
