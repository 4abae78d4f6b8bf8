"""Continuous batching over a paged KV cache: which tokens of which sequences run in the next step.

Plain Python, no torch and no clock (``now`` is passed in), so every policy here is unit-tested.

A step, under a token budget (``max_num_batched_tokens``):

1. every running sequence that is decoding gets its one token, best first;
2. running sequences part-way through a prefill continue, best first, in chunks that fill the rest
   of the budget (a chunk that does not fit in the free blocks shrinks to what fits);
3. if nothing was preempted in this step, waiting sequences start in order (head of line: the
   first that cannot get its first chunk's blocks stops admission), up to ``max_num_seqs`` running.

So a long prompt is prefilled over several steps and never stalls running decodes.

Order ("best first"): priority (lower first), then deadline (earlier first, none last), then
arrival, then the order of ``add``. The waiting queue is kept in this order, running sequences are
served in it, and preemption takes the worst.

Preemption by recompute: when a running sequence needs a block and none is free (free cached blocks
count as free: they are evicted first), the worst running sequence -- possibly the one asking --
loses its blocks, its ``num_computed_tokens`` goes back to 0 and it rejoins the waiting queue in its
place; its generated tokens stay in ``token_ids``, so it later re-prefills prompt + generated (the
prefix cache often gives much of that back). If it already had a chunk in this step, that chunk is
withdrawn. Waiting sequences never preempt running ones, and nothing is admitted in a step that
preempted, so freed blocks go to the running sequences that needed them.

Why this always makes progress: the best unfinished sequence is never preempted while it runs
(preemption takes the worst, and takes the asker only when another runs beside it, and one running
alone that fits in the whole cache always finds room); while it waits it heads the queue, nothing
overtakes it, and the running ones drain until its first chunk fits. It then gains at least one
token every step, since ``max_num_batched_tokens >= max_num_seqs`` leaves budget beyond the other
sequences' decodes. A sequence that could never fit in the cache is refused at ``add``
(``max_num_tokens`` known) or raises when it outgrows the cache alone; the engine should reject
such requests before ``add``.
"""

from __future__ import annotations

import heapq
import math
from collections.abc import Mapping
from dataclasses import dataclass, field

from gpu_workers.block_manager import BlockManager
from gpu_workers.sampling_params import EngineRequestError
from gpu_workers.sequence import Sequence, SequenceStatus

_OrderKey = tuple[int, float, float, int]


@dataclass(frozen=True, slots=True)
class SchedulerConfig:
    max_num_seqs: int = 128  # running sequences at most
    max_num_batched_tokens: int = 512  # tokens per step, decodes and prefill chunks together
    # Split long prefills over steps. Off, a prefill runs whole in one step; so that no sequence
    # waits forever, the step's first prefill may then exceed what is left of the budget.
    chunked_prefill: bool = True

    def __post_init__(self) -> None:
        if self.max_num_seqs < 1:
            raise ValueError(f"max_num_seqs must be >= 1, got {self.max_num_seqs}")
        if self.max_num_batched_tokens < self.max_num_seqs:
            raise ValueError(
                f"max_num_batched_tokens ({self.max_num_batched_tokens}) must be >= max_num_seqs "
                f"({self.max_num_seqs}), so prefills progress beside a full batch of decodes"
            )


@dataclass(frozen=True, slots=True)
class ScheduledChunk:
    seq: Sequence
    start: int  # first position to compute: seq.num_computed_tokens before the step
    num_tokens: int  # tokens start .. start + num_tokens - 1 run through the model
    samples: bool  # reaches the sequence's last token: the engine samples its next token


@dataclass(slots=True)
class SchedulerOutput:
    chunks: list[ScheduledChunk] = field(default_factory=list)  # decodes first, then prefill chunks
    # Lost their blocks in this step and went back to waiting (none of them has a chunk here).
    preempted: list[Sequence] = field(default_factory=list)

    @property
    def num_batched_tokens(self) -> int:
        return sum(c.num_tokens for c in self.chunks)



class Scheduler:
    """Owns the waiting queue and the running set; one ``schedule`` then one ``postprocess`` a step.

    The engine ends sequences itself (``finish``: EOS, stop, max tokens) or on request (``abort``).
    """

    def __init__(self, block_manager: BlockManager, config: SchedulerConfig | None = None) -> None:
        self.block_manager = block_manager
        self.config = config or SchedulerConfig()
        self._seqs: dict[str, Sequence] = {}
        self._order: dict[Sequence, _OrderKey] = {}
        self._waiting: list[tuple[_OrderKey, Sequence]] = []  # heap; keys are unique
        self._running: list[Sequence] = []
        self._num_added = 0
        self.num_preemptions = 0  # since start (stats)

    # -- queue ---------------------------------------------------------------------------------

    def add(self, seq: Sequence) -> None:
        """Queue a new sequence. Raises EngineRequestError when it could never fit in the cache."""
        if seq.request_id in self._seqs:
            raise ValueError(f"request {seq.request_id} is already scheduled")
        if seq.status is not SequenceStatus.WAITING or seq.block_table or seq.num_computed_tokens:
            raise ValueError(f"request {seq.request_id}: only a fresh waiting sequence can be added")
        need = seq.max_num_tokens if seq.max_num_tokens is not None else seq.num_tokens
        capacity = self.block_manager.longest_sequence(self._max_chunk(seq))
        if capacity is not None and need > capacity:
            raise EngineRequestError(
                f"request {seq.request_id} may need {need} tokens of KV cache; the whole cache holds "
                f"{capacity} of one sequence"
            )
        deadline = math.inf if seq.deadline is None else seq.deadline
        self._order[seq] = (seq.priority, deadline, seq.arrival, self._num_added)
        self._num_added += 1
        self._seqs[seq.request_id] = seq
        heapq.heappush(self._waiting, (self._order[seq], seq))

    def abort(self, request_id: str) -> Sequence | None:
        """Drop a sequence wherever it is and free its blocks now; None for an unknown id."""
        seq = self._seqs.get(request_id)
        if seq is not None:
            self._remove(seq)
        return seq

    def finish(self, request_id: str) -> Sequence:
        """The engine ended this sequence: free its blocks. KeyError for an unknown id."""
        seq = self._seqs.get(request_id)
        if seq is None:
            raise KeyError(f"request {request_id} is not scheduled")
        self._remove(seq)
        return seq

    def get(self, request_id: str) -> Sequence | None:
        return self._seqs.get(request_id)

    def has_work(self) -> bool:
        return bool(self._running or self._waiting)

    @property
    def num_running(self) -> int:
        return len(self._running)

    @property
    def num_waiting(self) -> int:
        return len(self._waiting)

    @property
    def running(self) -> list[Sequence]:
        """Running sequences, best first."""
        return sorted(self._running, key=self._order.__getitem__)

    @property
    def waiting(self) -> list[Sequence]:
        """Waiting sequences in the order they would start."""
        return [seq for _, seq in sorted(self._waiting, key=lambda entry: entry[0])]

    def not_started(self) -> list[str]:
        """Ids of the waiting sequences never scheduled (a preempted one has been): in start order."""
        return [seq.request_id for seq in self.waiting if seq.first_scheduled is None]

    # -- a step --------------------------------------------------------------------------------

    def schedule(self, now: float) -> SchedulerOutput:
        """Choose this step's chunks (see the module docstring for the policy)."""
        step = _Step(self.config.max_num_batched_tokens)
        self._running.sort(key=self._order.__getitem__)

        for seq in list(self._running):
            if seq.status is SequenceStatus.RUNNING and seq.num_uncomputed_tokens == 1 and step.budget:
                self._schedule_running(seq, 1, step)

        for seq in list(self._running):
            if step.budget <= 0:
                break
            if seq.status is not SequenceStatus.RUNNING or seq in step.chunks:
                continue
            self._schedule_running(seq, min(seq.num_uncomputed_tokens, step.budget), step)

        if not step.preempted:
            self._admit(now, step)

        return SchedulerOutput(chunks=list(step.chunks.values()), preempted=step.preempted)

    def postprocess(self, output: SchedulerOutput, sampled: Mapping[str, int]) -> None:
        """Record a finished step: advance each chunk's progress and append sampled tokens.

        ``sampled`` maps request id to the token sampled for each chunk with ``samples`` set.
        Chunks of sequences aborted or finished since ``schedule`` are skipped.
        """
        for chunk in output.chunks:
            seq = chunk.seq
            if seq.status is not SequenceStatus.RUNNING or self._seqs.get(seq.request_id) is not seq:
                continue
            if seq.num_computed_tokens != chunk.start:
                raise RuntimeError(
                    f"request {seq.request_id}: chunk starts at {chunk.start} but "
                    f"{seq.num_computed_tokens} tokens are computed (one postprocess per schedule)"
                )
            seq.num_computed_tokens += chunk.num_tokens
            if chunk.samples:
                if seq.request_id not in sampled:
                    raise KeyError(f"no sampled token for request {seq.request_id}")
                seq.token_ids.append(sampled[seq.request_id])
            self.block_manager.mark_computed(seq)
            self.block_manager.release_out_of_window(seq)

    # -- internals -----------------------------------------------------------------------------

    def _max_chunk(self, seq: Sequence) -> int:
        """The most tokens ``seq`` computes in one step: a first chunk never exceeds the budget
        when prefills are chunked (later ones shrink to the free slots), else its whole prompt."""
        return self.config.max_num_batched_tokens if self.config.chunked_prefill else seq.num_tokens

    def _schedule_running(self, seq: Sequence, want: int, step: _Step) -> None:
        """Give a running sequence up to ``want`` tokens, shrinking to the free slots, preempting
        the worst running sequence when not even one slot is free."""
        bm = self.block_manager
        while True:
            n = min(want, bm.num_appendable_tokens(seq))
            if n > 0:
                ok = bm.ensure_capacity(seq, seq.num_computed_tokens + n)
                assert ok
                step.add(seq, n)
                return
            victim = max(self._running, key=self._order.__getitem__)
            if victim is seq and len(self._running) == 1:
                raise EngineRequestError(
                    f"request {seq.request_id} has outgrown the whole KV cache "
                    f"({bm.capacity_tokens} tokens); the engine must cap prompt + max tokens"
                )
            self._preempt(victim, step)
            if victim is seq:
                return

    def _admit(self, now: float, step: _Step) -> None:
        bm = self.block_manager
        admitted = False
        while self._waiting and step.budget > 0 and len(self._running) < self.config.max_num_seqs:
            seq = self._waiting[0][1]
            if self.config.chunked_prefill:
                want = step.budget
            else:
                # Unchunked, running sequences are all decoding: the first admitted is the step's
                # first prefill, which runs whole even past the budget, so long prompts still start.
                want = seq.num_uncomputed_tokens
                if want > step.budget and admitted:
                    break
            if not bm.allocate(seq, want):
                break
            heapq.heappop(self._waiting)
            seq.status = SequenceStatus.RUNNING
            if seq.first_scheduled is None:
                seq.first_scheduled = now
            self._running.append(seq)
            step.add(seq, min(seq.num_uncomputed_tokens, want))
            admitted = True

    def _preempt(self, seq: Sequence, step: _Step) -> None:
        self.block_manager.free(seq)
        seq.status = SequenceStatus.WAITING
        self._running.remove(seq)
        step.withdraw(seq)
        step.preempted.append(seq)
        self.num_preemptions += 1
        heapq.heappush(self._waiting, (self._order[seq], seq))

    def _remove(self, seq: Sequence) -> None:
        if seq.status is SequenceStatus.RUNNING:
            self._running.remove(seq)
        elif seq.status is SequenceStatus.WAITING:
            self._waiting = [entry for entry in self._waiting if entry[1] is not seq]
            heapq.heapify(self._waiting)
        self.block_manager.free(seq)
        seq.status = SequenceStatus.FINISHED
        del self._seqs[seq.request_id]
        del self._order[seq]


class _Step:
    """The chunks of the step being built, its budget left, and its preemptions."""

    def __init__(self, budget: int) -> None:
        self.budget = budget
        self.chunks: dict[Sequence, ScheduledChunk] = {}
        self.preempted: list[Sequence] = []

    def add(self, seq: Sequence, num_tokens: int) -> None:
        start = seq.num_computed_tokens
        samples = start + num_tokens == seq.num_tokens
        self.chunks[seq] = ScheduledChunk(seq, start, num_tokens, samples)
        self.budget -= num_tokens

    def withdraw(self, seq: Sequence) -> None:
        chunk = self.chunks.pop(seq, None)
        if chunk is not None:
            self.budget += chunk.num_tokens
