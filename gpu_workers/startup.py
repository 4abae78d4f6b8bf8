"""A worker's start-up, never silent: a line per phase, load progress, a ``loading`` registry entry.

Starting a group of a real model takes a while (weights read and converted, packed for the CPU's
matmuls, the KV cache allocated, kernels compiled). Each phase logs a line when it starts and when
it ends, with its duration (``phase``); loaders wrap their per-tensor loop in ``track``, which draws
a tqdm progress bar on a terminal and logs a progress line every few seconds otherwise (logs of
honcho, systemd or Kubernetes are not terminals). Both are plain functions any loader calls
(safetensors, GGUF). Meanwhile ``LoadingBeacon`` heartbeats the group with state ``loading`` and the
current phase, so ``ryzanstein status`` and health checks show the group loading rather than absent;
balancers route only to ``ready`` groups.
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
import sys
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from typing import TypeVar

from redis import Redis

from broker.connection import TRANSIENT_ERRORS
from broker.keys import Keys
from broker.registry import GroupLoad
from broker.scripts import Scripts

log = logging.getLogger("gpu_workers.startup")
T = TypeVar("T")

PROGRESS_LOG_S = 5.0  # without a terminal: a progress line this often

_current = {"phase": ""}  # the phase running now (read by LoadingBeacon's thread)


def current_phase() -> str:
    return _current["phase"]


@contextlib.contextmanager
def phase(name: str, detail: str = "", *, monotonic: Callable[[], float] = time.monotonic) -> Iterator[None]:
    """One start-up phase (``load``, ``pack``, ``KV allocation``, ``kernel compile``...): a line when
    it starts and one when it ends, with the seconds it took."""
    began = monotonic()
    outer, _current["phase"] = _current["phase"], name
    log.info("start-up: %s%s...", name, f" ({detail})" if detail else "")
    try:
        yield
    finally:
        _current["phase"] = outer
    log.info("start-up: %s done in %.1fs", name, monotonic() - began)


def track(items: Iterable[T], *, total: int, what: str, unit: str = "tensors",
          terminal: bool | None = None, monotonic: Callable[[], float] = time.monotonic) -> Iterator[T]:
    """``items``, reporting progress: a tqdm bar on a terminal (``terminal``: None asks stderr),
    else a log line every PROGRESS_LOG_S seconds and one at the end."""
    if terminal is None:
        terminal = sys.stderr.isatty()
    if terminal:
        from tqdm import tqdm

        yield from tqdm(items, total=total, desc=what, unit=f" {unit}", file=sys.stderr, leave=False,
                        mininterval=0.25, dynamic_ncols=True)
        return
    began = last = monotonic()
    for done, item in enumerate(items, start=1):
        yield item
        now = monotonic()
        if now - last >= PROGRESS_LOG_S and done < total:
            last = now
            rate = done / max(now - began, 1e-9)
            log.info("%s: %d/%d %s (%.0f%%), %.1fs, about %.0fs left", what, done, total, unit,
                     100 * done / max(total, 1), now - began, (total - done) / rate)


class LoadingBeacon:
    """Heartbeats a group that is still loading: state ``loading`` and the phase, every interval.

    Started before the model is built and stopped just before the group registers for real (whose
    first heartbeat overwrites every field). If loading fails, ``withdraw`` removes the entry.
    """

    def __init__(self, redis: Redis, keys: Keys, load: GroupLoad, *, interval_s: float) -> None:
        self._redis, self._keys, self._load = redis, keys, load
        self._scripts = Scripts(redis)
        self.interval_s = interval_s
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="loading-beacon", daemon=True)

    def beat(self) -> None:
        self._load.phase = current_phase()
        self._scripts.heartbeat(registry=self._keys.groups, info=self._keys.group_info(self._load.name),
                                group=self._load.name, fields=self._load.to_fields())

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self.beat()
            except TRANSIENT_ERRORS as exc:  # Redis away: the group's own loop reports it later
                log.debug("loading heartbeat failed: %s", exc)
            except Exception:  # a beacon must never break the start-up it reports on
                log.debug("loading heartbeat failed", exc_info=True)
            self._stop.wait(self.interval_s)

    def start(self) -> LoadingBeacon:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout=5)

    def withdraw(self) -> None:
        """Loading failed: the group never served; take its entry out of the registry."""
        self.stop()
        with contextlib.suppress(*TRANSIENT_ERRORS):
            pipe = self._redis.pipeline(transaction=False)
            pipe.zrem(self._keys.groups, self._load.name)
            pipe.delete(self._keys.group_info(self._load.name))
            pipe.execute()


def loading_load(name: str, *, model: str, tp: int, kv_dtype: str, served_models: list[str] | None = None
                 ) -> GroupLoad:
    """What a loading group publishes: its identity and the names it will serve, nothing to route by yet."""
    return GroupLoad(name=name, tp=tp, model=model, kv_dtype=kv_dtype, kv_capacity_tokens=0, kv_used_tokens=0,
                     running=0, waiting=0, queue_depth=0, leader_pid=os.getpid(), host=socket.gethostname(),
                     max_context=0, vocab_size=0, state="loading", served_models=list(served_models or []))
