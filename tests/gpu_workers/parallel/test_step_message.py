"""Step messages: followers rebuild exactly the leader's chunks, and each message carries only diffs.

The schedules come from the real scheduler and block manager (chunked prefill, prefix-cache hits,
preemption by recompute under a small cache, finishing and aborting), so every kind of change a
block table or a sequence goes through is encoded and decoded.
"""

from __future__ import annotations

import itertools
import random

import pytest

from gpu_workers.block_manager import BlockManager
from gpu_workers.model_runner import Chunk
from gpu_workers.parallel.step_message import (
    CHUNK_FIELDS,
    HEADER,
    PING,
    STOP,
    StepDecoder,
    StepEncoder,
    control_message,
)
from gpu_workers.scheduler import Scheduler, SchedulerConfig, SchedulerOutput
from gpu_workers.sequence import Sequence

BS = 4


def chunks_of(plan: SchedulerOutput) -> list[Chunk]:
    """What LlamaEngine.step hands its runner."""
    return [Chunk(c.seq.token_ids[c.start : c.start + c.num_tokens], c.start, c.seq.block_table, c.samples, seq=c.seq,
                  staging=tuple(c.seq.staging)) for c in plan.chunks]


def as_tuples(chunks: list[Chunk]) -> list[tuple[list[int], int, list[int], bool, tuple[int, ...]]]:
    return [(list(c.token_ids), c.start, list(c.block_table), c.want_logits, c.staging) for c in chunks]


def test_prefill_then_decodes_send_each_token_once() -> None:
    encoder, decoder = StepEncoder(), StepDecoder()
    seq = Sequence("a", list(range(100, 110)), 10)
    seq.block_table = [7, 3, 9]
    first = Chunk(seq.token_ids[:6], 0, seq.block_table, False, seq=seq)
    message = encoder.encode([first])
    assert message[:HEADER] == [1, len(message), 1, 0]
    assert message[HEADER + 4 : HEADER + 7] == [6, 3, 0]  # 6 new tokens, 3 blocks extending an empty table
    assert as_tuples(decoder.decode(message)) == as_tuples([first])

    rest = Chunk(seq.token_ids[6:10], 6, seq.block_table, True, seq=seq)
    message = encoder.encode([rest])
    assert message[HEADER + 4 : HEADER + 7] == [4, 0, 0]  # the 4 tokens not sent yet; the table is known
    assert as_tuples(decoder.decode(message)) == as_tuples([rest])

    seq.token_ids.append(555)  # sampled
    seq.block_table.append(2)
    decode = Chunk([555], 10, seq.block_table, True, seq=seq)
    message = encoder.encode([decode])
    assert len(message) == HEADER + CHUNK_FIELDS + 1 + 1  # one token, one appended block
    assert as_tuples(decoder.decode(message)) == as_tuples([decode])


def test_chunks_that_want_every_token_s_logits_say_so() -> None:
    """Prompt logprobs: followers compute the same logit rows (the LM head gathers them to rank 0)."""
    encoder, decoder = StepEncoder(), StepDecoder()
    seq = Sequence("p", list(range(20, 28)), 8)
    seq.block_table = [5, 6]
    chunks = [Chunk(seq.token_ids[:5], 0, seq.block_table, False, seq=seq, all_logits=True)]
    (got,) = decoder.decode(encoder.encode(chunks))
    assert (got.want_logits, got.all_logits) == (False, True)
    last = Chunk(seq.token_ids[5:], 5, seq.block_table, True, seq=seq, all_logits=True)
    (got,) = decoder.decode(encoder.encode([last]))
    assert (got.want_logits, got.all_logits) == (True, True)


def test_released_sequences_are_forgotten_by_followers() -> None:
    encoder, decoder = StepEncoder(), StepDecoder()
    a, b = Sequence("a", [1, 2, 3], 3), Sequence("b", [4, 5], 2)
    a.block_table, b.block_table = [0], [1]
    decoder.decode(encoder.encode([Chunk([1, 2, 3], 0, [0], True, seq=a), Chunk([4, 5], 0, [1], True, seq=b)]))
    assert len(decoder.seqs) == 2
    encoder.release("a")
    encoder.release("a")  # twice: named once
    encoder.release("never-seen")
    message = encoder.encode([Chunk([6], 2, [1], True, seq=Sequence("b", [4, 5, 6], 2))])
    assert message[2:4] == [1, 1]  # one chunk, one released handle
    decoder.decode(message)
    assert len(decoder.seqs) == 1
    assert decoder.decode(encoder.encode([]))  == [] and len(decoder.seqs) == 1


def test_control_messages_and_malformed_ones() -> None:
    assert control_message(PING) == [PING, HEADER, 0, 0]
    decoder = StepDecoder()
    with pytest.raises(ValueError, match="not a step message"):
        decoder.decode(control_message(STOP))
    message = StepEncoder().encode([Chunk([1, 2], 0, [0], True, seq=Sequence("a", [1, 2], 2))])
    with pytest.raises(ValueError, match="not a step message"):
        decoder.decode(message[:-1])
    broken = list(message)
    broken[HEADER + 4] = 1  # claims one new token where two are needed
    broken = broken[:-2] + broken[-1:]
    broken[1] = len(broken)
    with pytest.raises(ValueError, match="chunk ends at token 2, 1 known"):
        StepDecoder().decode(broken)


@pytest.mark.parametrize("seed", range(4))
def test_followers_rebuild_every_chunk_of_a_real_schedule(seed: int) -> None:
    """Many sequences through a small cache: chunked prefill, shared prefixes (prefix-cache hits),
    preemptions (tables replaced, tokens recomputed without being sent again), finish and abort;
    odd seeds with a staged KV format's dense blocks (sinks, each sequence's staging block)."""
    rng = random.Random(seed)
    scheduler = Scheduler(BlockManager(14, BS, prefix_caching=True, num_dense_blocks=8 * (seed % 2)),
                          SchedulerConfig(max_num_seqs=6, max_num_batched_tokens=12))
    encoder, decoder = StepEncoder(), StepDecoder()
    shared = [rng.randrange(1000) for _ in range(9)]
    fresh = itertools.count(5000)
    seqs: dict[str, Sequence] = {}
    live: dict[str, int] = {}  # request id -> output tokens still to generate
    sent: dict[str, int] = {}  # request id -> token ids sent for it
    reached: dict[str, int] = {}  # request id -> furthest chunk end
    computed: dict[str, int] = {}  # request id -> tokens run through the model
    replaced = 0
    for now in range(400):
        if len(seqs) < 24 and rng.random() < 0.3:
            prompt = (shared if rng.random() < 0.5 else []) + [next(fresh) for _ in range(rng.randrange(1, 14))]
            rid = f"r{len(seqs)}"
            seqs[rid] = Sequence(rid, prompt, len(prompt), arrival=float(now))
            scheduler.add(seqs[rid])
            live[rid] = rng.randrange(1, 30)
        if live and rng.random() < 0.03:  # a client cancels
            rid = rng.choice(sorted(live))
            scheduler.abort(rid)
            encoder.release(rid)
            del live[rid]
        plan = scheduler.schedule(float(now))
        chunks = chunks_of(plan)
        message = encoder.encode(chunks)
        assert as_tuples(decoder.decode(message)) == as_tuples(chunks)
        records = message[HEADER + message[3] :]
        for i, c in enumerate(chunks):
            _handle, start, n, _logits, new_tokens, _new_blocks, replace, staging = records[
                i * CHUNK_FIELDS : (i + 1) * CHUNK_FIELDS]
            assert staging == (1 if seed % 2 else 0)
            rid = c.seq.request_id
            replaced += bool(replace and rid in sent)
            sent[rid] = sent.get(rid, 0) + new_tokens
            reached[rid] = max(reached.get(rid, 0), start + n)
            computed[rid] = computed.get(rid, 0) + n
        sampled = {c.seq.request_id: next(fresh) for c in plan.chunks if c.samples}
        scheduler.postprocess(plan, sampled)
        for rid in sampled:
            live[rid] -= 1
            if live[rid] == 0:
                scheduler.finish(rid)
                encoder.release(rid)
                del live[rid]
    assert len(seqs) - len(live) > 10 and scheduler.num_preemptions > 0 and replaced > 0
    assert set(decoder.seqs) == {encoder._sent[rid].handle for rid in live if rid in encoder._sent}
    # each token id went out once, up to where its sequence got, however often it was recomputed
    assert sent == reached
    assert any(computed[rid] > reached[rid] for rid in computed)  # some were recomputed
