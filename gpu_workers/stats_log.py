"""The periodic stats line a group leader logs at INFO, like vLLM's engine stats: what runs and waits,
prompt and generation throughput, KV cache use and the prefix-cache hit rate.

Written every ``stats_log_interval_s`` while the group has work or did some in the interval, and once
more when it goes idle; never while it stays idle (an idle log is a quiet one).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

from broker.registry import GroupLoad
from gpu_workers.engine import EngineStats

log = logging.getLogger("gpu_workers.stats")


class StatsLine:
    def __init__(self, *, interval_s: float, monotonic: Callable[[], float] = time.monotonic) -> None:
        self.interval_s = interval_s  # 0: never
        self._monotonic = monotonic
        self._since = monotonic()
        self._prompt_tokens = 0
        self._generated = 0
        self._was_busy = False

    def prompt(self, tokens: int) -> None:
        self._prompt_tokens += tokens

    def generated(self, tokens: int) -> None:
        self._generated += tokens

    def heartbeat(self, load: GroupLoad, stats: EngineStats) -> str | None:
        """Log the line if it is due; returns it (None when nothing was logged)."""
        now = self._monotonic()
        elapsed = now - self._since
        if self.interval_s <= 0 or elapsed < self.interval_s:
            return None
        busy = bool(load.running or load.waiting or load.queue_depth or self._generated or self._prompt_tokens)
        line = None
        if busy or self._was_busy:
            kv = (f"{100 * load.kv_used_tokens / load.kv_capacity_tokens:.1f}%" if load.kv_capacity_tokens > 0
                  else "-")
            hit = "-" if stats.prefix_cache_hit_rate is None else f"{100 * stats.prefix_cache_hit_rate:.1f}%"
            line = (f"running {load.running}, waiting {load.waiting}, queued {load.queue_depth}; "
                    f"prompt {self._prompt_tokens / elapsed:.1f} tok/s, generation {self._generated / elapsed:.1f} "
                    f"tok/s; KV cache {kv} used; prefix cache hit {hit}")
            log.info("%s", line)
        self._was_busy = busy
        self._since, self._prompt_tokens, self._generated = now, 0, 0
        return line
