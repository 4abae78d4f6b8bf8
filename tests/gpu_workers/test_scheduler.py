"""Scheduler: continuous batching with chunked prefill, ordering, max_num_seqs, preemption by
recompute, abort, and simulated runs on a fake KV cache that checks every computed slot."""

from __future__ import annotations

import itertools
import random
from collections import Counter

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gpu_workers.block_manager import BlockManager
from gpu_workers.sampling_params import EngineRequestError
from gpu_workers.scheduler import Scheduler, SchedulerConfig, SchedulerOutput
from gpu_workers.sequence import Sequence, SequenceStatus

BS = 4
_fresh_tokens = itertools.count(10_000)


def make(rid: str, prompt: list[int] | int, *, priority: int = 0, arrival: float = 0.0,
         deadline: float | None = None, max_num_tokens: int | None = None) -> Sequence:
    """A sequence; an int prompt is that many tokens shared with no other sequence."""
    tokens = [next(_fresh_tokens) for _ in range(prompt)] if isinstance(prompt, int) else prompt
    return Sequence(rid, tokens, len(tokens), priority=priority, arrival=arrival, deadline=deadline,
                    max_num_tokens=max_num_tokens)


def sched(num_blocks: int = 64, *, max_num_seqs: int = 8, budget: int = 16, chunked: bool = True,
          caching: bool = True) -> Scheduler:
    bm = BlockManager(num_blocks, BS, prefix_caching=caching)
    return Scheduler(bm, SchedulerConfig(max_num_seqs=max_num_seqs, max_num_batched_tokens=budget,
                                         chunked_prefill=chunked))


def next_token(seq: Sequence) -> int:
    """The fake model's output: depends only on the position, so recompute reproduces it."""
    return 1000 + seq.num_tokens


def shape(out: SchedulerOutput) -> list[tuple[str, int, int, bool]]:
    return [(c.seq.request_id, c.start, c.num_tokens, c.samples) for c in out.chunks]


def step(s: Scheduler, now: float = 0.0) -> SchedulerOutput:
    out = s.schedule(now)
    s.postprocess(out, {c.seq.request_id: next_token(c.seq) for c in out.chunks if c.samples})
    return out


class FakeEngine:
    """Drives a scheduler like an engine: writes each chunk into a fake KV cache whose slots hold the
    prefix they were computed from, checks invariants every step, finishes sequences at their max
    output tokens."""

    def __init__(self, s: Scheduler, max_new: dict[str, int] | None = None) -> None:
        self.s = s
        self.bm = s.block_manager
        self.max_new = max_new if max_new is not None else {}
        self.slots: dict[int, tuple[int, ...]] = {}
        self.finished: list[Sequence] = []
        self.num_preempted = 0

    def add(self, seq: Sequence, max_new: int) -> None:
        self.max_new[seq.request_id] = max_new
        self.s.add(seq)

    def slot(self, seq: Sequence, pos: int) -> int:
        return seq.block_table[pos // BS] * BS + pos % BS

    def step(self, now: float = 0.0) -> SchedulerOutput:
        out = self.s.schedule(now)
        check_invariants(self.s, out)
        self.num_preempted += len(out.preempted)
        for c in out.chunks:
            seq = c.seq
            for pos in range(c.start):  # what the model would read: cached and earlier K/V
                assert self.slots[self.slot(seq, pos)] == tuple(seq.token_ids[: pos + 1])
            for pos in range(c.start, c.start + c.num_tokens):
                self.slots[self.slot(seq, pos)] = tuple(seq.token_ids[: pos + 1])
        self.s.postprocess(out, {c.seq.request_id: next_token(c.seq) for c in out.chunks if c.samples})
        for c in out.chunks:
            if c.samples and c.seq.num_output_tokens >= self.max_new[c.seq.request_id]:
                self.finished.append(self.s.finish(c.seq.request_id))
        return out


def check_invariants(s: Scheduler, out: SchedulerOutput) -> None:
    bm = s.block_manager
    running, waiting = s.running, s.waiting
    assert len(running) <= s.config.max_num_seqs
    held = Counter(b for seq in running for b in seq.block_table)
    assert [blk.ref_count for blk in bm.blocks] == [held[i] for i in range(bm.num_blocks)]
    assert bm.num_free_blocks + bm.num_used_blocks == bm.num_blocks
    assert bm.num_free_blocks == sum(1 for blk in bm.blocks if blk.ref_count == 0)
    for blk in bm.blocks:
        if blk.hash is not None:
            assert bm._by_hash[blk.hash] == blk.block_id
    for seq in waiting:
        assert seq.status is SequenceStatus.WAITING and seq.block_table == [] and seq.num_computed_tokens == 0
    for seq in out.preempted:
        assert seq in waiting and all(c.seq is not seq for c in out.chunks)
    if s.config.chunked_prefill:
        assert out.num_batched_tokens <= s.config.max_num_batched_tokens
    written: set[int] = set()
    for c in out.chunks:
        seq = c.seq
        assert seq.status is SequenceStatus.RUNNING and c.start == seq.num_computed_tokens
        assert c.num_tokens >= 1 and c.samples == (c.start + c.num_tokens == seq.num_tokens)
        assert len(seq.block_table) * BS >= c.start + c.num_tokens
        blocks = {seq.block_table[p // BS] for p in range(c.start, c.start + c.num_tokens)}
        for b in blocks:  # a block being written is private and not in the prefix cache
            assert bm.blocks[b].ref_count == 1 and bm.blocks[b].hash is None
        assert not blocks & written
        written |= blocks
    # Decodes never stall: every running decode has its token in this step.
    scheduled = {c.seq for c in out.chunks}
    assert all(seq in scheduled for seq in running if seq.num_uncomputed_tokens == 1)


# -- continuous batching and chunked prefill ---------------------------------------------------


def test_long_prompt_is_chunked_while_a_decode_runs_every_step() -> None:
    s = sched(budget=8, max_num_seqs=4)
    s.add(make("d", 3))
    assert shape(step(s)) == [("d", 0, 3, True)]
    s.add(make("p", 20, arrival=1.0))
    assert shape(step(s)) == [("d", 3, 1, True), ("p", 0, 7, False)]
    assert shape(step(s)) == [("d", 4, 1, True), ("p", 7, 7, False)]
    assert shape(step(s)) == [("d", 5, 1, True), ("p", 14, 6, True)]
    assert shape(step(s)) == [("d", 6, 1, True), ("p", 20, 1, True)]
    assert s.get("p").token_ids[20:] == [1020, 1021]


def test_partial_prefill_continues_before_a_better_new_sequence_starts() -> None:
    s = sched(budget=8)
    s.add(make("p1", 20))
    assert shape(step(s)) == [("p1", 0, 8, False)]
    s.add(make("p2", 12, priority=-1, arrival=1.0))
    assert shape(step(s)) == [("p1", 8, 8, False)]
    assert shape(step(s)) == [("p1", 16, 4, True), ("p2", 0, 4, False)]


def test_waiting_order_priority_then_deadline_then_arrival_then_add_order() -> None:
    s = sched(max_num_seqs=1)
    for seq in [
        make("p0-d5", 2, deadline=5.0, arrival=3.0),
        make("p1-d0", 2, priority=1, deadline=0.0),
        make("p0-none-a1", 2, arrival=1.0),
        make("p0-d1", 2, deadline=1.0, arrival=9.0),
        make("p0-none-a0", 2, arrival=0.0),
        make("p-1", 2, priority=-1, arrival=10.0),
        make("p0-none-a1-later-add", 2, arrival=1.0),
    ]:
        s.add(seq)
    expected = ["p-1", "p0-d1", "p0-d5", "p0-none-a0", "p0-none-a1", "p0-none-a1-later-add", "p1-d0"]
    assert [seq.request_id for seq in s.waiting] == expected
    started = []
    for t in range(len(expected)):
        out = step(s, now=float(t))
        started.append(out.chunks[0].seq.request_id)
        assert out.chunks[0].seq.first_scheduled == float(t)
        s.finish(started[-1])
    assert started == expected


def test_max_num_seqs_caps_running() -> None:
    s = sched(max_num_seqs=2)
    for i in range(5):
        s.add(make(f"r{i}", 2, arrival=float(i)))
    out = step(s)
    assert [c.seq.request_id for c in out.chunks] == ["r0", "r1"]
    assert (s.num_running, s.num_waiting) == (2, 3)
    assert [c.seq.request_id for c in step(s).chunks] == ["r0", "r1"]
    s.finish("r0")
    assert [c.seq.request_id for c in step(s).chunks] == ["r1", "r2"]


def test_unchunked_prefill_runs_whole_and_may_exceed_the_budget_once() -> None:
    s = sched(budget=8, chunked=False)
    s.add(make("long", 20))
    s.add(make("short", 3, arrival=1.0))
    assert shape(step(s)) == [("long", 0, 20, True)]
    assert shape(step(s)) == [("long", 20, 1, True), ("short", 0, 3, True)]


# -- preemption ------------------------------------------------------------------------------


def test_preemption_takes_the_worst_running_and_keeps_its_tokens() -> None:
    s = sched(num_blocks=4, budget=16, caching=False)
    s.add(make("a", 4, priority=0, arrival=0.0))
    s.add(make("b", 4, priority=1, arrival=1.0))
    s.add(make("c", 4, priority=0, arrival=2.0))
    step(s)  # one block each, one free
    b = s.get("b")
    b_tokens = list(b.token_ids)
    out = step(s)  # a takes the free block; c needs one too: b (worst priority) is preempted
    assert shape(out) == [("a", 4, 1, True), ("c", 4, 1, True)]
    assert out.preempted == [b] and s.num_preemptions == 1
    assert b.status is SequenceStatus.WAITING and b.num_computed_tokens == 0 and b.block_table == []
    assert b.token_ids == b_tokens and b.num_output_tokens == 1
    assert [seq.request_id for seq in s.waiting] == ["b"]

    s.finish("a")
    out = step(s)
    assert shape(out) == [("c", 5, 1, True), ("b", 0, 5, True)]  # recompute: prompt + generated
    assert b.token_ids == b_tokens + [1005]


def test_not_started_lists_the_waiting_never_scheduled_not_the_preempted() -> None:
    s = sched(num_blocks=4, budget=16, max_num_seqs=3, caching=False)
    for rid, priority in (("a", 0), ("b", 1), ("c", 0), ("late", 2), ("later", 3)):
        s.add(make(rid, 4, priority=priority))
    assert s.not_started() == ["a", "c", "b", "late", "later"]  # in the order they would start
    step(s)  # a, c, b start (max_num_seqs 3)
    assert s.not_started() == ["late", "later"]
    out = step(s)  # b is preempted: it waits again, but it has started (and generated a token)
    assert [seq.request_id for seq in out.preempted] == ["b"]
    assert [seq.request_id for seq in s.waiting] == ["b", "late", "later"]
    assert s.not_started() == ["late", "later"]
    s.abort("late")
    assert s.not_started() == ["later"]


def test_a_sequence_may_preempt_itself_when_it_is_the_worst() -> None:
    s = sched(num_blocks=2, caching=False)
    s.add(make("a", 2, priority=0))
    s.add(make("b", 4, priority=1))
    step(s)
    out = step(s)  # a still has room in its block; b needs a new one and is the worst
    assert shape(out) == [("a", 2, 1, True)]
    assert [seq.request_id for seq in out.preempted] == ["b"]


def test_preempting_an_already_scheduled_decode_withdraws_its_chunk() -> None:
    s = sched(num_blocks=4, budget=8, max_num_seqs=2, caching=False)
    s.add(make("d", 3, priority=1))
    step(s)
    s.add(make("p", 14, priority=0, arrival=1.0))
    assert shape(step(s)) == [("d", 3, 1, True), ("p", 0, 7, False)]
    # d takes the last free block; p's chunk shrinks to the one slot left rather than preempting.
    assert shape(step(s)) == [("d", 4, 1, True), ("p", 7, 1, False)]
    out = step(s)  # no slot for p: d, the worst, loses its blocks and its already given token
    assert shape(out) == [("p", 8, 6, True)]
    assert [seq.request_id for seq in out.preempted] == ["d"]


def test_nothing_is_admitted_in_a_step_that_preempted() -> None:
    s = sched(num_blocks=4, caching=False)
    s.add(make("a", 4, priority=0))
    s.add(make("b", 12, priority=1))
    step(s)  # all four blocks in use
    s.add(make("w", 2, priority=0, arrival=1.0))
    out = step(s)
    assert shape(out) == [("a", 4, 1, True)] and [q.request_id for q in out.preempted] == ["b"]
    assert s.get("w").status is SequenceStatus.WAITING  # would fit, but waits a step
    out = step(s)
    assert shape(out) == [("a", 5, 1, True), ("w", 0, 2, True)]
    assert s.get("b").status is SequenceStatus.WAITING  # needs 4 blocks, 1 free


def test_recompute_after_preemption_reuses_surviving_cached_blocks() -> None:
    s = sched(num_blocks=6, caching=True)
    s.add(make("a", 4, priority=0))
    s.add(make("b", 12, priority=1))
    step(s)  # a: 1 block, b: 3 blocks (all full and computed: cached once freed), 2 free
    for _ in range(4):
        step(s)  # a decodes into a second block; b into a fourth: no block free
    out = step(s)  # a needs a third block: b is preempted, its blocks go to the cached LRU
    assert [q.request_id for q in out.preempted] == ["b"]
    s.finish("a")
    out = step(s)
    b = s.get("b")
    # b's tail block was evicted first (a took it); its first three blocks survived.
    assert b.num_cached_tokens == 12
    assert shape(out) == [("b", 12, 5, True)]


# -- end of life ----------------------------------------------------------------------------


def test_abort_frees_at_once_from_waiting_and_running() -> None:
    s = sched(num_blocks=8, max_num_seqs=1)
    s.add(make("run", 10))
    s.add(make("wait", 3))
    step(s)
    bm = s.block_manager
    assert bm.num_free_blocks == 5
    aborted = s.abort("run")
    assert aborted is not None and aborted.status is SequenceStatus.FINISHED
    assert bm.num_free_blocks == 8 and aborted.block_table == []
    waiting = s.get("wait")
    assert s.abort("wait") is waiting and waiting.status is SequenceStatus.FINISHED
    assert (s.num_running, s.num_waiting, s.has_work()) == (0, 0, False)
    assert s.abort("run") is None and s.abort("unknown") is None


def test_postprocess_skips_a_chunk_aborted_after_schedule() -> None:
    s = sched()
    s.add(make("a", 3))
    s.add(make("b", 3))
    out = s.schedule(0.0)
    s.abort("a")
    s.postprocess(out, {"b": 7})  # no token for a: it is gone
    assert s.get("b").token_ids[-1] == 7 and s.get("a") is None


def test_finish_unknown_raises() -> None:
    with pytest.raises(KeyError):
        sched().finish("nope")


def test_add_refuses_what_could_never_fit_and_duplicates() -> None:
    s = sched(num_blocks=2)  # 8 tokens
    with pytest.raises(EngineRequestError, match="whole cache holds 8"):
        s.add(make("long", 9))
    with pytest.raises(EngineRequestError):
        s.add(make("grows", 3, max_num_tokens=9))
    s.add(make("ok", 3, max_num_tokens=8))
    with pytest.raises(ValueError, match="already"):
        s.add(make("ok", 3))


def test_a_sequence_outgrowing_the_whole_cache_alone_raises() -> None:
    s = sched(num_blocks=2)
    s.add(make("g", 6))  # no max_num_tokens: the engine did not cap it
    step(s)
    step(s)
    step(s)  # 8 tokens computed... the ninth has no slot anywhere
    with pytest.raises(EngineRequestError, match="outgrown"):
        step(s)


def test_config_needs_budget_for_a_prefill_beside_a_full_batch() -> None:
    with pytest.raises(ValueError, match="max_num_batched_tokens"):
        SchedulerConfig(max_num_seqs=64, max_num_batched_tokens=32)


# -- simulated runs ---------------------------------------------------------------------------


@pytest.mark.parametrize(("chunked", "caching"), [(True, True), (True, False), (False, True)])
def test_simulated_run_finishes_everything_without_leaks(chunked: bool, caching: bool) -> None:
    rng = random.Random(1234)
    s = sched(num_blocks=12, max_num_seqs=4, budget=8, chunked=chunked, caching=caching)
    engine = FakeEngine(s)
    prefixes = [[rng.randrange(50) for _ in range(n)] for n in (4, 8, 9)]
    pending = []
    for i in range(30):
        prompt = rng.choice(prefixes) + [rng.randrange(50) for _ in range(rng.randrange(0, 12))]
        max_new = rng.randrange(1, 48 - len(prompt))
        seq = Sequence(f"r{i}", prompt, len(prompt), priority=rng.randrange(3), arrival=float(i),
                       deadline=rng.choice([None, float(i + 5)]), max_num_tokens=len(prompt) + max_new)
        pending.append((seq, max_new))
    for t in range(5000):
        while pending and rng.random() < 0.3:
            engine.add(*pending.pop(0))
        engine.step(now=float(t))
        if not pending and not s.has_work():
            break
    assert not s.has_work() and len(engine.finished) == 30
    for seq in engine.finished:
        expected = [1000 + seq.num_prompt_tokens + k for k in range(engine.max_new[seq.request_id])]
        assert seq.token_ids[seq.num_prompt_tokens:] == expected
        assert seq.status is SequenceStatus.FINISHED and seq.block_table == []
    bm = s.block_manager
    assert bm.num_free_blocks == bm.num_blocks and all(b.ref_count == 0 for b in bm.blocks)
    assert engine.num_preempted > 0  # the cache was small enough to force recompute
    if caching:
        assert bm.prefix_hit_tokens > 0


ops = st.lists(
    st.one_of(
        st.tuples(st.just("add"), st.integers(0, 2), st.integers(0, 10), st.integers(0, 2),
                  st.integers(1, 12)),
        st.tuples(st.just("abort"), st.integers(0, 40)),
        st.tuples(st.just("step")),
    ),
    max_size=60,
)


@settings(max_examples=80, deadline=None)
@given(ops=ops, caching=st.booleans())
def test_random_operations_keep_the_invariants(ops: list[tuple], caching: bool) -> None:
    s = sched(num_blocks=8, max_num_seqs=3, budget=6, caching=caching)
    engine = FakeEngine(s)
    prefixes = [[1, 2, 3, 4, 5], [1, 2, 3, 4, 9, 9, 9, 9], [7]]
    added: list[str] = []
    for op in ops:
        if op[0] == "add":
            _, which, extra, priority, max_new = op
            prompt = prefixes[which] + list(range(20, 20 + extra))
            max_new = min(max_new, 32 - len(prompt))
            rid = f"r{len(added)}"
            engine.add(Sequence(rid, prompt, len(prompt), priority=priority, arrival=float(len(added)),
                                max_num_tokens=len(prompt) + max_new), max_new)
            added.append(rid)
        elif op[0] == "abort":
            if added:
                s.abort(added[op[1] % len(added)])
        else:
            engine.step()
    for _ in range(500):
        if not s.has_work():
            break
        engine.step()
    assert not s.has_work()
    bm = s.block_manager
    assert bm.num_free_blocks == bm.num_blocks and all(b.ref_count == 0 for b in bm.blocks)
