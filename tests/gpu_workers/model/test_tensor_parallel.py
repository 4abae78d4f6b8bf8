"""Tensor-parallel sharding without torch.distributed.

Each layer's ranks are built in one process from the same full weights; combining their partial
results (concatenation for column-parallel outputs, sum for row-parallel ones) must give the
single-rank result. Then a whole model runs as two and four ranks in threads whose collectives
meet in memory, and rank 0 must get the single-rank logits. tests/gpu_workers/parallel runs real
rank processes.
"""

from __future__ import annotations

import random
import threading
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

from gpu_workers.model.layers import (
    ColumnParallelLinear,
    MergedColumnParallelLinear,
    ParallelLMHead,
    QKVParallelLinear,
    RowParallelLinear,
    TPContext,
    VocabParallelEmbedding,
)
from gpu_workers.model_runner import Chunk, ModelRunner
from tests.gpu_workers.model.hf_models import assert_close, build, random_tokens, save

F32 = torch.float32


def _ranks(size: int) -> list[TPContext]:
    return [TPContext(rank=r, size=size) for r in range(size)]


class _Recorder:
    """Single-process stand-ins for collectives: all_reduce leaves the partial sum as it is;
    gather (on rank 0, the only rank given a list) puts its part in its own place and zeros
    elsewhere, so summing what each rank contributes combines them. ``calls`` lists the collectives
    made, ``rank`` is the rank running."""

    def __init__(self) -> None:
        self.calls: list[str] = []
        self.rank = 0
        self.gathered: list[torch.Tensor] = []  # what each rank sent to the gathers

    def all_reduce(self, t: torch.Tensor, group: object = None) -> None:
        self.calls.append("all_reduce")

    def gather(self, t: torch.Tensor, parts: list[torch.Tensor] | None = None, dst: int = 0,
               group: object = None) -> None:
        self.calls.append("gather")
        assert dst == 0 and (parts is not None) == (self.rank == 0), "only rank 0 receives the gather"
        self.gathered.append(t.clone())
        for i, p in enumerate(parts or []):
            p.zero_() if i != self.rank else p.copy_(t)


@pytest.fixture
def collectives(monkeypatch: pytest.MonkeyPatch) -> _Recorder:
    recorder = _Recorder()
    monkeypatch.setattr(dist, "all_reduce", recorder.all_reduce)
    monkeypatch.setattr(dist, "gather", recorder.gather)
    return recorder


def test_column_parallel_outputs_concatenate() -> None:
    w, b, x = torch.randn(12, 8), torch.randn(12), torch.randn(5, 8)
    full = ColumnParallelLinear(8, 12, bias=True, tp=TPContext(), dtype=F32)
    parts = [ColumnParallelLinear(8, 12, bias=True, tp=tp, dtype=F32) for tp in _ranks(2)]
    for layer in (full, *parts):
        layer.weight.weight_loader(layer.weight, w)
        layer.bias.weight_loader(layer.bias, b)
    assert parts[0].weight.shape == (6, 8)
    assert torch.allclose(torch.cat([p(x) for p in parts], dim=-1), full(x), atol=1e-6)


def test_merged_gate_up_concatenates_per_part() -> None:
    gate, up, x = torch.randn(10, 8), torch.randn(10, 8), torch.randn(3, 8)
    layers = [MergedColumnParallelLinear(8, [10, 10], bias=False, tp=tp, dtype=F32) for tp in [TPContext(), *_ranks(2)]]
    for layer in layers:
        layer.weight.weight_loader(layer.weight, gate, 0)
        layer.weight.weight_loader(layer.weight, up, 1)
    full, *parts = [layer(x) for layer in layers]
    gates = torch.cat([p[:, :5] for p in parts], dim=-1)
    ups = torch.cat([p[:, 5:] for p in parts], dim=-1)
    assert torch.allclose(torch.cat([gates, ups], dim=-1), full, atol=1e-6)


@pytest.mark.parametrize("kv_heads", [4, 2, 1], ids=["kv-split", "kv-split-gqa", "kv-replicated"])
def test_qkv_shards_by_heads(kv_heads: int) -> None:
    heads, d, hidden = 4, 3, 8
    q, k, v = torch.randn(heads * d, hidden), torch.randn(kv_heads * d, hidden), torch.randn(kv_heads * d, hidden)
    biases = {"q": torch.randn(heads * d), "k": torch.randn(kv_heads * d), "v": torch.randn(kv_heads * d)}
    x = torch.randn(5, hidden)
    layers = [QKVParallelLinear(hidden, d, heads, kv_heads, bias=True, tp=tp, dtype=F32) for tp in [TPContext(), *_ranks(2)]]
    for layer in layers:
        for shard, w in zip("qkv", (q, k, v)):
            layer.weight.weight_loader(layer.weight, w, shard)
            layer.bias.weight_loader(layer.bias, biases[shard], shard)
    full, *parts = [layer(x) for layer in layers]
    local_kv = max(1, kv_heads // 2)
    split = [heads // 2 * d, local_kv * d, local_kv * d]
    q_parts, k_parts, v_parts = zip(*(p.split(split, dim=-1) for p in parts))
    f_q, f_k, f_v = full.split([heads * d, kv_heads * d, kv_heads * d], dim=-1)
    assert torch.allclose(torch.cat(q_parts, -1), f_q, atol=1e-6)
    if kv_heads >= 2:
        assert torch.allclose(torch.cat(k_parts, -1), f_k, atol=1e-6)
        assert torch.allclose(torch.cat(v_parts, -1), f_v, atol=1e-6)
    else:  # both ranks hold the one KV head
        assert all(torch.allclose(kp, f_k, atol=1e-6) for kp in k_parts)
        assert all(torch.allclose(vp, f_v, atol=1e-6) for vp in v_parts)


@pytest.mark.parametrize("kv_heads", [4, 2, 1], ids=["kv-split", "kv-split-gqa", "kv-replicated"])
def test_fused_checkpoint_tensors_split_like_their_parts(kv_heads: int) -> None:
    """Phi-3's fused qkv_proj and gate_up_proj (shard id None) load into each rank exactly what
    their q, k, v (gate, up) parts load."""
    heads, d, hidden, inter = 4, 3, 8, 10
    q, k, v = torch.randn(heads * d, hidden), torch.randn(kv_heads * d, hidden), torch.randn(kv_heads * d, hidden)
    gate, up = torch.randn(inter, hidden), torch.randn(inter, hidden)
    for tp in [TPContext(), *_ranks(2)]:
        by_parts, fused = (QKVParallelLinear(hidden, d, heads, kv_heads, bias=False, tp=tp, dtype=F32) for _ in "ab")
        for shard, w in zip("qkv", (q, k, v)):
            by_parts.weight.weight_loader(by_parts.weight, w, shard)
        fused.weight.weight_loader(fused.weight, torch.cat([q, k, v]))
        assert torch.equal(fused.weight, by_parts.weight)
        by_parts, fused = (MergedColumnParallelLinear(hidden, [inter, inter], bias=False, tp=tp, dtype=F32) for _ in "ab")
        by_parts.weight.weight_loader(by_parts.weight, gate, 0)
        by_parts.weight.weight_loader(by_parts.weight, up, 1)
        fused.weight.weight_loader(fused.weight, torch.cat([gate, up]))
        assert torch.equal(fused.weight, by_parts.weight)
    with pytest.raises(ValueError, match="checkpoint shape"):
        fused.weight.weight_loader(fused.weight, torch.cat([gate, up, up]))


def test_row_parallel_partials_sum(collectives: _Recorder) -> None:
    w, b, x = torch.randn(6, 10), torch.randn(6), torch.randn(4, 10)
    layers = [RowParallelLinear(10, 6, bias=True, tp=tp, dtype=F32) for tp in [TPContext(), *_ranks(2)]]
    for layer in layers:
        layer.weight.weight_loader(layer.weight, w)
        layer.bias.weight_loader(layer.bias, b)
    full = layers[0](x)
    assert collectives.calls == []  # one rank: no communication
    partial = [layer(xs) for layer, xs in zip(layers[1:], x.split(5, dim=-1))]
    assert collectives.calls == ["all_reduce", "all_reduce"]
    assert torch.allclose(partial[0] + partial[1], full, atol=1e-5)


def test_vocab_parallel_embedding_and_head(collectives: _Recorder) -> None:
    vocab, hidden = 11, 4  # odd: the last rank holds a padding row
    w = torch.randn(vocab, hidden)
    ids = torch.tensor([0, 5, 6, 10, 3])
    embeds = [VocabParallelEmbedding(vocab, hidden, tp=tp, dtype=F32) for tp in [TPContext(), *_ranks(2)]]
    heads = [ParallelLMHead(vocab, hidden, tp=tp, dtype=F32) for tp in [TPContext(), *_ranks(2)]]
    for layer in (*embeds, *heads):
        layer.weight.weight_loader(layer.weight, w)
    assert embeds[2].weight.shape == (6, hidden) and embeds[2].weight[5].eq(0).all()
    assert torch.equal(embeds[1](ids) + embeds[2](ids), embeds[0](ids))
    h = torch.randn(3, hidden)
    full = heads[0](h)
    outputs = []
    for rank, head in enumerate(heads[1:]):
        collectives.rank = rank
        outputs.append(head(h))
    assert outputs[0].shape == full.shape == (3, vocab)  # rank 0: the whole vocabulary
    assert outputs[1].shape == (3, 6)  # rank 1: its own part, padding row included
    assert torch.allclose(torch.cat(collectives.gathered, dim=-1)[:, :vocab], full, atol=1e-6)
    assert torch.allclose(outputs[0][:, :6], full[:, :6], atol=1e-6)
    assert collectives.calls == ["all_reduce", "all_reduce", "gather", "gather"]


class _ThreadGroup:
    """Collectives between threads, one thread per rank (torch ops release the GIL)."""

    def __init__(self, size: int) -> None:
        self.barrier = threading.Barrier(size, timeout=60)
        self.slots: list[torch.Tensor | None] = [None] * size
        self.local = threading.local()

    def all_reduce(self, t: torch.Tensor, group: object = None) -> None:
        self.slots[self.local.rank] = t.clone()
        self.barrier.wait()
        total = self.slots[0].clone()
        for s in self.slots[1:]:
            total += s
        self.barrier.wait()  # nobody overwrites a slot before every rank has summed
        t.copy_(total)

    def gather(self, t: torch.Tensor, parts: list[torch.Tensor] | None = None, dst: int = 0,
               group: object = None) -> None:
        self.slots[self.local.rank] = t.clone()
        self.barrier.wait()
        for p, s in zip(parts or [], self.slots):
            p.copy_(s)
        self.barrier.wait()


def ranks_match_one_rank(path: Path, size: int, monkeypatch: pytest.MonkeyPatch, *, kv_dtype: str = "fp32",
                         rel: float = 1e-5) -> tuple[ModelRunner, list[ModelRunner]]:
    """Prefill then decode two prompts on one runner and on ``size`` rank runners (threads standing
    in for processes); rank 0's logits must match the single runner's at every step. Returns the
    runners, for checks of what each holds."""
    group = _ThreadGroup(size)
    monkeypatch.setattr(dist, "all_reduce", group.all_reduce)
    monkeypatch.setattr(dist, "gather", group.gather)
    single = ModelRunner(path, num_blocks=16, block_size=4, kv_dtype=kv_dtype)
    ranks = [ModelRunner(path, num_blocks=16, block_size=4, kv_dtype=kv_dtype, tp=tp) for tp in _ranks(size)]

    rng = random.Random(0)
    prompts = [random_tokens(rng, n) for n in (9, 4)]
    tables = [[3, 1, 8, 0], [5, 2]]
    staging: list[tuple[int, ...]] = [(), ()]
    if single.kv_format.staged:  # block 0 and the staging blocks are dense blocks (ids 16 on)
        tables, staging = [[16, 1, 8, 0], [17, 2]], [(18,), (19,)]
    steps = [[Chunk(p, 0, t, True, staging=s) for p, t, s in zip(prompts, tables, staging)]]
    steps += [[Chunk([7 + i], len(p) + i, t, True, staging=s) for p, t, s in zip(prompts, tables, staging)]
              for i in range(3)]
    for chunks in steps:
        expected = single.run(chunks)
        results: list[torch.Tensor | None] = [None] * size

        def run_rank(rank: int, chunks: list[Chunk] = chunks, results: list = results) -> None:
            group.local.rank = rank
            results[rank] = ranks[rank].run(chunks)

        threads = [threading.Thread(target=run_rank, args=(r,)) for r in range(size)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert results[0] is not None  # only rank 0 gets the whole vocabulary's logits (it samples)
        assert_close(results[0], expected, rel=rel, what=f"{kv_dtype} tp={size} rank 0")
    return single, ranks


@pytest.mark.parametrize("size", [2, 4], ids=["tp2", "tp4-kv-replicated"])
def test_whole_model_ranks_match_one_rank(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, size: int) -> None:
    path = save(build("qwen2"), tmp_path)  # 4 heads, 2 KV heads, q/k/v bias
    _single, ranks = ranks_match_one_rank(path, size, monkeypatch)
    assert ranks[0].kv_cache.num_kv_heads == max(1, 2 // size)


@pytest.mark.parametrize("name", ["qwen3-bias-sliding", "phi3-sliding", "gemma3", "mistral"])
def test_each_family_ranks_match_one_rank(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, name: str) -> None:
    """Two ranks of every family (q/k norms replicated, Phi-3's fused tensors split, Gemma 3's one
    KV head replicated), with sequences longer than their sliding windows."""
    path = save(build(name), tmp_path)
    single, _ranks = ranks_match_one_rank(path, 2, monkeypatch)
    assert single.config.sliding_window is not None
