"""The leader's channel and a follower's end, with broadcasts carried between two threads: messages
of any length arrive whole, an idle leader pings, and any error inside a step ends the group."""

from __future__ import annotations

import queue
import threading
import time

import pytest
import torch
import torch.distributed as dist

from broker.errors import EngineFailed
from gpu_workers.parallel.channel import BUFFER_INTS, FollowerChannel, LeaderChannel
from gpu_workers.parallel.launch import TensorParallelGroup
from gpu_workers.parallel.step_message import PING, STOP


class _Broadcasts:
    """dist.broadcast from rank 0 (the test thread) to rank 1 (a follower thread), in order."""

    def __init__(self) -> None:
        self.sent: queue.Queue[torch.Tensor] = queue.Queue()
        self.follower = threading.local()
        self.fail_with: Exception | None = None
        self.calls = 0

    def broadcast(self, t: torch.Tensor, src: int = 0, group: object = None) -> None:
        self.calls += 1
        if getattr(self.follower, "is_follower", False):
            t.copy_(self.sent.get(timeout=10))
        elif self.fail_with is not None:
            raise self.fail_with
        else:
            self.sent.put(t.clone())


@pytest.fixture
def wire(monkeypatch: pytest.MonkeyPatch) -> _Broadcasts:
    broadcasts = _Broadcasts()
    monkeypatch.setattr(dist, "broadcast", broadcasts.broadcast)
    return broadcasts


def group() -> TensorParallelGroup:
    return TensorParallelGroup(rank=0, size=2, local_rank=0, local_size=2, device="cpu", compute=None,
                               control=None, timeout_s=4.0)


def receive(wire: _Broadcasts, count: int) -> list[list[int]]:
    """What a follower thread receives in ``count`` messages."""
    out: list[list[int]] = []

    def follow() -> None:
        wire.follower.is_follower = True
        end = FollowerChannel(group())
        out.extend(end.receive() for _ in range(count))

    thread = threading.Thread(target=follow)
    thread.start()
    thread.join(timeout=20)
    return out


def test_messages_of_any_length_arrive_whole(wire: _Broadcasts) -> None:
    leader = LeaderChannel(group(), ping_interval_s=60)
    messages = [[1, 4, 0, 0], [1, BUFFER_INTS, *range(BUFFER_INTS - 2)], [1, BUFFER_INTS + 1, *range(BUFFER_INTS - 1)],
                [1, 3 * BUFFER_INTS + 5, *range(3 * BUFFER_INTS + 3)], [1, 5, 0, 0, 7]]
    for m in messages:
        with leader.exclusive():
            leader.send(m)
    assert wire.calls == len(messages) + 2  # two longer than the buffer: a second broadcast each
    assert receive(wire, len(messages)) == messages
    leader.close()
    assert receive(wire, 1) == [[STOP, 4, 0, 0]]


def test_an_idle_leader_pings_and_a_busy_one_does_not(wire: _Broadcasts) -> None:
    leader = LeaderChannel(group(), ping_interval_s=0.05)
    with leader.exclusive():
        time.sleep(0.3)  # a long step: no ping meanwhile
    assert wire.sent.empty()
    time.sleep(0.3)
    leader.close()
    kinds = [m[0] for m in receive(wire, wire.sent.qsize())]
    assert kinds[-1] == STOP and len(kinds) >= 3 and set(kinds[:-1]) == {PING}


@pytest.mark.parametrize("error", [RuntimeError("Connection closed by peer"), ValueError("a bug mid-step")])
def test_an_error_in_a_step_ends_the_group(wire: _Broadcasts, error: Exception) -> None:
    leader = LeaderChannel(group(), ping_interval_s=60)
    with pytest.raises(EngineFailed, match=type(error).__name__), leader.exclusive():
        leader.send([1, 4, 0, 0])
        raise error  # e.g. in the layers' collectives
    with pytest.raises(EngineFailed):
        leader.check()
    with pytest.raises(EngineFailed), leader.exclusive():
        pytest.fail("a broken group runs no further step")
    leader.close()
    assert wire.sent.qsize() == 1  # no STOP: nobody is left to hear it


def test_a_failed_ping_ends_the_group(wire: _Broadcasts) -> None:
    wire.fail_with = RuntimeError("Timed out waiting 4000ms for send operation to complete")
    leader = LeaderChannel(group(), ping_interval_s=0.05)
    deadline = time.monotonic() + 5
    while not leader.failed and time.monotonic() < deadline:
        time.sleep(0.01)
    with pytest.raises(EngineFailed, match="Timed out"):
        leader.check()
    leader.close()
