"""Step messages from the leader to the other ranks, pings while idle, and noticing a lost rank.

A message is one broadcast from rank 0 on the control group of a fixed-size int64 buffer (the
header says how long the message is; a longer one sends its rest in a second broadcast), so a
step costs followers one collective besides the layers' own.

A group is only useful whole. Any collective error means a peer died (its connections closed) or
hangs (it did not answer within the group's timeout); from then on the leader's channel raises
``EngineFailed`` and a follower's ``receive`` raises, and each process exits. Followers wait for
the next message with the same timeout, so an idle leader pings them well within it: a follower
learns within the timeout that its leader is gone, and the leader learns within a ping interval
(or at its next step) that a follower is.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import torch
import torch.distributed as dist

from broker.errors import EngineFailed
from gpu_workers.parallel.launch import TensorParallelGroup
from gpu_workers.parallel.step_message import PING, STOP, control_message

log = logging.getLogger(__name__)

# 32 KiB: a decode step of a few hundred sequences, or a prefill chunk of a few thousand tokens,
# in one broadcast; on CPUs a gloo broadcast costs the same up to far larger sizes.
BUFFER_INTS = 4096


class LeaderChannel:
    """Rank 0's end: ``send`` inside ``exclusive``, and a thread that pings while the group idles."""

    def __init__(
        self, group: TensorParallelGroup, *, ping_interval_s: float | None = None,
        monotonic: Callable[[], float] = time.monotonic,
    ) -> None:
        self._group = group.control
        self._monotonic = monotonic
        self._lock = threading.Lock()  # one sequence of collectives at a time: a step's, or a ping
        self._buffer = torch.zeros(BUFFER_INTS, dtype=torch.int64)
        self._failure: str | None = None
        self._last = monotonic()  # end of the last message or step
        self._closed = threading.Event()
        self.ping_interval_s = ping_interval_s or min(1.0, group.timeout_s / 4)
        self._pinger = threading.Thread(target=self._keep_alive, name="tp-ping", daemon=True)
        self._pinger.start()

    @contextmanager
    def exclusive(self) -> Iterator[None]:
        """The group for one step: its message and the layers' collectives, nothing in between.

        Any error in it ends the group (EngineFailed): a collective error means a lost rank, and
        any other leaves the followers inside a step the leader will not finish, so the ranks'
        collectives could never pair up again.
        """
        with self._lock:
            self.check()
            try:
                yield
            except Exception as exc:
                self._fail(exc)
                raise EngineFailed(self._failure or str(exc)) from exc
            finally:
                self._last = self._monotonic()

    def send(self, message: list[int]) -> None:
        """Broadcast ``message`` (call inside ``exclusive``)."""
        head = message[:BUFFER_INTS]
        self._buffer[: len(head)] = torch.tensor(head, dtype=torch.int64)
        dist.broadcast(self._buffer, src=0, group=self._group)
        if len(message) > BUFFER_INTS:
            dist.broadcast(torch.tensor(message[BUFFER_INTS:], dtype=torch.int64), src=0, group=self._group)

    def check(self) -> None:
        """Raise EngineFailed once a rank was lost."""
        if self._failure is not None:
            raise EngineFailed(self._failure)

    @property
    def failed(self) -> bool:
        return self._failure is not None

    def close(self) -> None:
        """Stop pinging and tell the other ranks to exit (if they are still there to hear it)."""
        self._closed.set()
        self._pinger.join()
        with self._lock:
            if self._failure is None:
                try:
                    self.send(control_message(STOP))
                except RuntimeError as exc:
                    self._fail(exc)

    def _fail(self, exc: BaseException) -> None:
        if self._failure is None:
            what = str(exc).splitlines()[0] if str(exc) else repr(exc)
            self._failure = f"tensor-parallel group broken: {type(exc).__name__}: {what}"
            log.error("%s", self._failure, exc_info=not isinstance(exc, RuntimeError))

    def _keep_alive(self) -> None:
        while not self._closed.wait(self.ping_interval_s / 2):
            if self._monotonic() - self._last < self.ping_interval_s:
                continue
            if not self._lock.acquire(blocking=False):
                continue  # a step holds the group: that is traffic enough
            try:
                if self._failure is not None or self._closed.is_set():
                    return
                self.send(control_message(PING))
                self._last = self._monotonic()
            except RuntimeError as exc:
                self._fail(exc)
                return
            finally:
                self._lock.release()


class FollowerChannel:
    """A follower's end: ``receive`` waits (up to the group's timeout) for the leader's next message."""

    def __init__(self, group: TensorParallelGroup) -> None:
        self._group = group.control
        self._buffer = torch.zeros(BUFFER_INTS, dtype=torch.int64)

    def receive(self) -> list[int]:
        dist.broadcast(self._buffer, src=0, group=self._group)
        length = int(self._buffer[1])
        message = self._buffer[: min(length, BUFFER_INTS)].tolist()
        if length > BUFFER_INTS:
            rest = torch.empty(length - BUFFER_INTS, dtype=torch.int64)
            dist.broadcast(rest, src=0, group=self._group)
            message += rest.tolist()
        return message
