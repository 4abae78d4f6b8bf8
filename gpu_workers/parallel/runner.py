"""Both ends of a step: the leader's runner (message, then compute) and the followers' loop.

Every rank runs ``ModelRunner.run`` on the same chunks in the same order, so their layers'
collectives pair up; only the leader gets the full logits (``ParallelLMHead`` gathers them to
rank 0), samples and talks to Redis.
"""

from __future__ import annotations

import logging
import signal

import torch

from gpu_workers.engine import EXIT_ENGINE_FAILED
from gpu_workers.model_runner import Chunk, ModelRunner
from gpu_workers.parallel.channel import FollowerChannel, LeaderChannel
from gpu_workers.parallel.launch import TensorParallelGroup
from gpu_workers.parallel.step_message import PING, STOP, StepDecoder, StepEncoder

log = logging.getLogger(__name__)


class LeaderRunner:
    """Rank 0's runner: each step tells the other ranks what to compute, then computes its shards."""

    def __init__(self, runner: ModelRunner, group: TensorParallelGroup, *, ping_interval_s: float | None = None) -> None:
        self.runner = runner
        self.config = runner.config
        self.kv_cache = runner.kv_cache
        self._encoder = StepEncoder()
        self._channel = LeaderChannel(group, ping_interval_s=ping_interval_s)

    def run(self, chunks: list[Chunk]) -> torch.Tensor:
        """fp32 logits [n, vocab] of the chunks with ``want_logits`` (see ``ModelRunner.run``);
        EngineFailed when a rank is lost."""
        message = self._encoder.encode(chunks)
        with self._channel.exclusive():
            self._channel.send(message)
            return self.runner.run(chunks)

    def release(self, request_id: str) -> None:
        self._encoder.release(request_id)

    def check(self) -> None:
        self._channel.check()

    def close(self) -> None:
        """Tell the other ranks to exit."""
        self._channel.close()

    def weight_bytes(self) -> int:
        return self.runner.weight_bytes()


def serve_follower(runner: ModelRunner, group: TensorParallelGroup) -> int:
    """A follower's life after startup: run every step the leader sends until it says STOP (exit 0)
    or is lost (EXIT_ENGINE_FAILED). SIGINT and SIGTERM are the leader's to act on: it drains,
    then stops its ranks; a follower that left on its own would break the drain."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    channel = FollowerChannel(group)
    decoder = StepDecoder()
    steps = 0
    while True:
        try:
            message = channel.receive()
            kind = message[0]
            if kind == STOP:
                log.info("rank %d: stopped by the leader after %d steps", group.rank, steps)
                return 0
            if kind == PING:
                continue
            runner.run(decoder.decode(message))
            steps += 1
        except RuntimeError as exc:  # torch.distributed's errors: the leader or another rank is gone
            first = str(exc).splitlines()[0] if str(exc) else repr(exc)
            log.error("rank %d: tensor-parallel group lost a rank (%s); exiting", group.rank, first)
            return EXIT_ENGINE_FAILED
        except Exception:  # a bug: this rank cannot follow the leader's steps any more
            log.exception("rank %d: step failed; exiting", group.rank)
            return EXIT_ENGINE_FAILED
