"""The Llama engine on an fp8 KV cache, the default staged fp8_e4m3 and fp8_e4m3_block: greedy
tokens of clear-margin sequences equal the fp32 cache's (batched, with prefix-cache hits, under
preemption), tensor-parallel ranks keep their heads' blocks in fp8, and a fixed --kv-memory holds
~4x the fp32 tokens (fp8_e4m3_block) or what the staged format's sizing says."""

from __future__ import annotations

import random
from pathlib import Path

import pytest
import torch

from gpu_workers.engine import EngineRequest
from gpu_workers.model import fp8_kernels, kv_staged_kernels
from gpu_workers.model.fp8 import code_values
from gpu_workers.model_runner import Chunk, ModelRunner
from gpu_workers.sampling_params import SamplingParams
from tests.gpu_workers.model.hf_models import build, save
from tests.gpu_workers.model.test_tensor_parallel import ranks_match_one_rank
from tests.gpu_workers.reference import save_hf_model
from tests.gpu_workers.test_llm_engine import engine_for, generate

NEW_TOKENS = 6
GREEDY = SamplingParams(max_tokens=NEW_TOKENS, temperature=0.0)
# On this model an e4m3 cache moves next-token logits by at most ~0.05 of their standard deviation
# (measured over 24-token generations): a top-1/top-2 gap of twice that cannot flip.
FP8_MARGIN = 0.1
CANDIDATES = 100


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_hf_model(tmp_path_factory.mktemp("llama"), family="llama")


def fp32_greedy(model_dir: Path, prompts: list[list[int]]) -> tuple[list[list[int]], list[float]]:
    """Greedy continuations of ``prompts`` on an fp32 KV cache (the engine's fp32 path matches
    transformers to ~1e-6, tests/gpu_workers/test_llm_engine.py), and each one's smallest
    top-1/top-2 logit gap relative to the logits' standard deviation."""
    per_seq = -(-(max(map(len, prompts)) + NEW_TOKENS) // 16)
    runner = ModelRunner(model_dir, num_blocks=per_seq * len(prompts), block_size=16, kv_dtype="fp32")
    tables = [list(range(i * per_seq, (i + 1) * per_seq)) for i in range(len(prompts))]
    logits = runner.run([Chunk(p, 0, t, True) for p, t in zip(prompts, tables)])
    tokens: list[list[int]] = [[] for _ in prompts]
    margins = torch.full((len(prompts),), float("inf"))
    for step in range(NEW_TOKENS):
        top = logits.topk(2, dim=-1).values
        margins = torch.minimum(margins, (top[:, 0] - top[:, 1]) / logits.std(dim=-1))
        for seq, token in zip(tokens, logits.argmax(dim=-1).tolist()):
            seq.append(token)
        if step + 1 < NEW_TOKENS:
            logits = runner.run([Chunk([seq[-1]], len(p) + step, t, True) for p, seq, t in zip(prompts, tokens, tables)])
    return tokens, margins.tolist()


def clear_prompts(
    model_dir: Path, count: int, *, prefix: list[int] | None = None, lengths: tuple[int, ...] = (5, 12, 20, 40)
) -> tuple[list[list[int]], list[list[int]]]:
    """``count`` prompts (``prefix`` and random tokens, of one of ``lengths``) whose greedy
    continuations keep a top-1/top-2 gap of at least FP8_MARGIN at every step, and those continuations."""
    rngs = [random.Random(seed) for seed in range(CANDIDATES)]
    candidates = [(prefix or []) + [rng.randrange(320) for _ in range(rng.choice(lengths))] for rng in rngs]
    tokens, margins = fp32_greedy(model_dir, candidates)
    clear = [i for i, margin in enumerate(margins) if margin >= FP8_MARGIN][:count]
    assert len(clear) == count, f"fewer than {count} clear-margin prompts among {CANDIDATES}"
    return [candidates[i] for i in clear], [tokens[i] for i in clear]


def requests(prompts: list[list[int]]) -> list[EngineRequest]:
    return [EngineRequest(f"r{i}", p, GREEDY) for i, p in enumerate(prompts)]


@pytest.mark.parametrize("kv_dtype,kernels", [("fp8_e4m3", True), ("fp8_e4m3", False), ("fp8_e4m3_block", True),
                                              ("fp8_e4m3_block", False)],
                         ids=["staged-kernels", "staged-torch", "block-fused-kernels", "block-torch-gather"])
def test_fp8_greedy_matches_the_fp32_reference(llama_dir: Path, monkeypatch: pytest.MonkeyPatch, kv_dtype: str,
                                               kernels: bool) -> None:
    if not kernels:
        monkeypatch.setattr(fp8_kernels, "load", lambda *a: None)
        monkeypatch.setattr(kv_staged_kernels, "load", lambda *a: None)
    prompts, expected = clear_prompts(llama_dir, 5)
    engine = engine_for(llama_dir, kv_dtype=kv_dtype, max_num_batched_tokens=32, max_num_seqs=16)
    assert engine.runner.kv_cache.fused_attention is kernels
    out = generate(engine, requests(prompts))
    assert [out[f"r{i}"] for i in range(len(prompts))] == expected


@pytest.mark.parametrize("kv_dtype", ["fp8_e4m3", "fp8_e4m3_block"])
def test_fp8_prefix_cache_hits_keep_tokens(llama_dir: Path, kv_dtype: str) -> None:
    prefix = [random.Random(7).randrange(320) for _ in range(48)]
    prompts, expected = clear_prompts(llama_dir, 3, prefix=prefix)
    engine = engine_for(llama_dir, kv_dtype=kv_dtype)
    first = generate(engine, requests(prompts[:1]))
    rest = generate(engine, [EngineRequest(f"r{i}", p, GREEDY) for i, p in enumerate(prompts) if i])
    assert engine.stats().prefix_cache_hit_rate > 0.3
    assert [first["r0"], rest["r1"], rest["r2"]] == expected


def test_fp8_preemption_keeps_tokens_and_capacity_is_honest(llama_dir: Path) -> None:
    # 44-token prompts take 3 blocks and need a 4th at their 5th token: six of them cannot all fit
    prompts, expected = clear_prompts(llama_dir, 6, lengths=(44,))
    # 2 layers x 2 (K, V) x 2 KV heads x (16 x 16 one-byte values + a 4-byte scale) = 2,080 bytes a block
    engine = engine_for(llama_dir, kv_dtype="fp8_e4m3_block", kv_memory=str(10 * 2080 + 2079))
    assert engine.stats().kv_capacity_tokens == 160
    cache = engine.runner.kv_cache
    allocated = cache.values.numel() + cache.scales.numel() * 4
    assert allocated == 10 * 2080 == cache.bytes_per_block() * 10
    out = generate(engine, requests(prompts))
    assert engine.scheduler.num_preemptions > 0
    assert [out[f"r{i}"] for i in range(len(prompts))] == expected
    assert engine.stats().kv_used_tokens == 0


def test_capacity_at_a_fixed_kv_memory(llama_dir: Path) -> None:
    engines = {d: engine_for(llama_dir, kv_dtype=d, kv_memory="1MiB")
               for d in ("fp32", "bf16", "fp8_e4m3", "fp8_e4m3_block", "fp8_e5m2", "fp8_e4m3_per_tensor")}
    capacity = {d: e.stats().kv_capacity_tokens for d, e in engines.items()}
    assert capacity["fp8_e4m3_block"] == capacity["fp8_e5m2"]
    assert capacity["fp8_e4m3_block"] >= 3.8 * capacity["fp32"]
    assert capacity["fp8_e4m3_block"] >= 1.9 * capacity["bf16"]
    assert capacity["fp8_e4m3_per_tensor"] == 4 * capacity["fp32"]  # no per-block scales to store
    # The staged format: two bf16 blocks (a sink and a staging block) per sequence it may run, at most
    # a quarter of the budget (here the quarter binds: 64 blocks), of 2 layers x 2 (K, V) x 2 KV heads
    # x 16 x 16 x 2 bytes = 4,096 bytes; the rest in fp8 blocks of 2 x 2 x (16 x 16 codes) + 2 x (K: 16
    # centre codes, a 4-byte centre scale, 16 bf16 channel scales; V: 16 bf16 token scales) = 2,384
    # bytes. Head_dim 16 makes the scales weigh, and so does the bf16 pool in a 1 MiB budget: 2.5x
    # fp32 here, 3.5x at SmolLM2's head_dim 64 in 4 GiB (benchmarks/kv_cache.py).
    staged = engines["fp8_e4m3"].runner.kv_cache
    assert (staged.num_dense_blocks, staged.bytes_per_dense_block(), staged.bytes_per_block()) == (64, 4096, 2384)
    assert staged.nbytes() <= 2**20 < staged.nbytes() + 2384
    assert capacity["fp8_e4m3"] == (2**20 - 64 * 4096) // 2384 * 16 >= 2.5 * capacity["fp32"]


def test_tensor_parallel_ranks_keep_their_heads_in_fp8(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Scales are per KV head, so each rank's fp8 blocks hold the single rank's codes for its heads:
    exactly in the first layer, whose K/V both compute from the same embeddings with the same
    column slices (a column-sharded matmul gives the full one's bits), and within one code step in
    later ones; two ranks give the single rank's logits.

    Later layers are not bit-exact: a row-parallel o_proj/down_proj sums each rank's half of the
    input features and then all-reduces, a different summation order than one matmul over all of
    them (Megatron's split, on every device). Their fp32 K/V then differ by ~1e-6, and a value near
    a rounding boundary takes the neighbouring code (1 of 1,024 on an AVX2 EPYC, code 156 vs 157).
    Scales shared across heads, or a rank storing the other head, change the first layer's codes."""
    path = save(build("qwen2"), tmp_path)  # 2 KV heads
    single, ranks = ranks_match_one_rank(path, 2, monkeypatch, kv_dtype="fp8_e4m3_block", rel=1e-4)
    assert ranks[0].kv_cache.num_kv_heads == 1
    bs = single.kv_cache.block_size

    def scales(runner: ModelRunner) -> torch.Tensor:  # [layer, k|v, head, block]
        assert runner.kv_cache.scales is not None
        return runner.kv_cache.scales

    def dequantized(runner: ModelRunner, head: int) -> torch.Tensor:  # [layer, k|v, slot, D]
        per_slot = scales(runner)[:, :, head].repeat_interleave(bs, dim=-1)[..., None]
        return code_values(runner.kv_cache.values[:, :, head], torch.float8_e4m3fn, torch.float32) * per_slot

    for rank, runner in enumerate(ranks):
        assert torch.equal(runner.kv_cache.values[0, :, 0], single.kv_cache.values[0, :, rank])
        assert torch.equal(scales(runner)[0, :, 0], scales(single)[0, :, rank])
        ours, theirs = dequantized(runner, 0), dequantized(single, rank)
        # one e4m3 step: 2^-3 of the larger magnitude (normals), 2^-9 of the scale (subnormals)
        step = 2.0**-3 * torch.maximum(ours.abs(), theirs.abs()) + 2.0**-9 * scales(single).max()
        assert bool(((ours - theirs).abs() <= step).all()), f"rank {rank}: a code moved by more than one step"


def test_staged_tensor_parallel_ranks_match_one_rank(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The staged format's scales (K centres and channel scales, V token scales) are per KV head too:
    two ranks, one KV head each, give the single rank's logits, prefill and decode."""
    path = save(build("qwen2"), tmp_path)  # 2 KV heads
    _single, ranks = ranks_match_one_rank(path, 2, monkeypatch, kv_dtype="fp8_e4m3", rel=1e-4)
    assert ranks[0].kv_cache.num_kv_heads == 1 and ranks[0].kv_cache.format.staged
