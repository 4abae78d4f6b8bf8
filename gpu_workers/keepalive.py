"""Heartbeats while one engine step runs long.

The group loop heartbeats between steps. A single step of a real model can take longer than
``dead_after_s`` (a 512-token prefill chunk of a large model on a CPU, a busy machine), and balancers
would fail a healthy group over. So while a step runs, a side thread repeats the loop's last
heartbeat every interval — but only for ``max_step_s``: an engine that hangs stops beating and is
failed over, and a process that is killed or stopped (SIGSTOP, a GC pause holds every thread) stops
beating at once, as before. The leader's readiness probe follows the same rule (``Probe.step_started``).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable

from broker.connection import TRANSIENT_ERRORS
from broker.metrics import Probe

log = logging.getLogger(__name__)


class StepKeepalive:
    def __init__(
        self,
        beat: Callable[[], None],
        *,
        interval_s: float,
        max_step_s: float,
        monotonic: Callable[[], float] = time.monotonic,
        probe: Probe | None = None,
    ) -> None:
        self._beat = beat
        self._probe = probe  # told when steps start and end: a long step keeps the process ready
        self.interval_s = interval_s
        self.max_step_s = max_step_s
        self._monotonic = monotonic
        self._step_started: float | None = None
        self._last_beat = monotonic()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def step_started(self) -> None:
        self._step_started = self._last_beat = self._monotonic()
        if self._probe is not None:
            self._probe.step_started()

    def step_ended(self) -> None:
        self._step_started = None
        if self._probe is not None:
            self._probe.step_ended()

    def check(self) -> bool:
        """Beat if a step has run for an interval since the last beat, and not past max_step_s."""
        started, now = self._step_started, self._monotonic()
        if started is None or now - self._last_beat < self.interval_s or now - started > self.max_step_s:
            return False
        self._last_beat = now
        try:
            self._beat()
        except TRANSIENT_ERRORS as exc:  # the loop handles Redis outages; just try again next time
            log.debug("keepalive heartbeat failed: %s", exc)
            return False
        return True

    def start(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="step-keepalive", daemon=True)
            self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
            self._thread = None

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s / 4):
            self.check()
