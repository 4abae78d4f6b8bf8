"""The staged fp8 KV cache (gpu_workers/model/kv_staged.py, ``--kv-dtype fp8_e4m3``): what each read
returns is what the scheme defines (kv_quant.py's functions on the block's bf16 values, the sink and
the query's own block in bf16) whichever steps wrote it; and the engine's logits equal
benchmarks/kv_schemes.py's simulation of the same scheme in transformers' forward."""

from __future__ import annotations

import random
from pathlib import Path

import pytest
import torch

from benchmarks import kv_schemes
from gpu_workers.model import kv_quant
from gpu_workers.model.kv_cache import KV_FORMATS
from gpu_workers.model.kv_staged import StagedKVCache
from gpu_workers.model_runner import Chunk, ModelRunner
from tests.gpu_workers.model.hf_models import build, random_tokens, save

BS, HKV, D, BLOCKS = 4, 2, 8, 6


def make_runner(path: Path, *, block_size: int = BS) -> ModelRunner:
    return ModelRunner(path, num_blocks=BLOCKS * 2, block_size=block_size, kv_dtype="fp8_e4m3")


def bf16(x: torch.Tensor) -> torch.Tensor:
    return x.to(torch.bfloat16).float()


def test_the_default_fp8_format_is_the_staged_one_and_its_sizes() -> None:
    fmt = KV_FORMATS["fp8_e4m3"]
    assert fmt.staged and not KV_FORMATS["fp8_e4m3_block"].staged
    # K and V of one head and block: codes, then K's centres (D), centre scale (4), channel scales (2D), V's (2 BS)
    assert 2 * fmt.bytes_per_head_block(16, 64) == kv_quant.bytes_per_block(16, 64) == 2048 + 64 + 4 + 128 + 32
    cache = StagedKVCache(num_dense_blocks=3, num_layers=2, num_blocks=5, block_size=16, num_kv_heads=2, head_dim=64,
                          kv_dtype="fp8_e4m3")
    assert cache.bytes_per_block() == 2 * 2 * kv_quant.bytes_per_block(16, 64)
    assert cache.bytes_per_dense_block() == 2 * 2 * 2 * 16 * 64 * 2
    allocated = sum(t.numel() * t.element_size() for t in (cache.values, cache.dense, cache.k_centre,
                                                             cache.k_centre_scale, cache.k_scale, cache.v_scale))
    assert allocated == cache.nbytes()


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save(build("llama-gqa", std=0.3), tmp_path_factory.mktemp("staged"))


def captured_kv(runner: ModelRunner, monkeypatch: pytest.MonkeyPatch) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Every layer-0 write's new ``k``, ``v`` [T, Hkv, D], in order."""
    seen: list[tuple[torch.Tensor, torch.Tensor]] = []
    original = StagedKVCache.write_staged

    def spy(self: StagedKVCache, layer: int, plan: object, k: torch.Tensor, v: torch.Tensor) -> None:
        if layer == 0:
            seen.append((k.clone(), v.clone()))
        original(self, layer, plan, k, v)  # type: ignore[arg-type]

    monkeypatch.setattr(StagedKVCache, "write_staged", spy)
    return seen


def test_blocks_hold_what_the_scheme_defines_whichever_steps_wrote_them(model_dir: Path,
                                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    """A sequence written by a prefill chunk spanning blocks, then chunks ending mid-block, then
    decodes: its fp8 blocks read back equal kv_quant's functions on the blocks' bf16 K/V (the sink
    and the staging block hold those bf16 values), and a decode reads block 0 and its own block in
    bf16, the others from fp8."""
    runner = make_runner(model_dir)
    seen = captured_kv(runner, monkeypatch)
    cache = runner.kv_cache
    assert isinstance(cache, StagedKVCache)
    n = cache.num_blocks
    table, staging = [n, 3, 7, 1, 9, 0], (n + 1,)
    tokens = random_tokens(random.Random(1), 19)
    for start, end in ((0, 6), (6, 9), (9, 15), (15, 16), (16, 17), (17, 18), (18, 19)):
        runner.run([Chunk(tokens[start:end], start, table, True, staging=staging)])
    k = torch.cat([kv[0] for kv in seen]).transpose(0, 1)  # [Hkv, 19, D] as computed, in order
    v = torch.cat([kv[1] for kv in seen]).transpose(0, 1)
    bs = cache.block_size
    for b in (1, 2, 3):  # complete blocks: fp8
        got = cache.gather_blocks(0, torch.tensor([[table[b]]]))
        keys = kv_quant.dequantize_keys(kv_quant.quantize_keys(bf16(k[:, b * bs : (b + 1) * bs])))
        values = kv_quant.dequantize_values(kv_quant.quantize_values(bf16(v[:, b * bs : (b + 1) * bs])))
        assert torch.equal(got.k[:, 0], keys) and torch.equal(got.v[:, 0], values)
    sink = cache.gather_blocks(0, torch.tensor([[table[0]]]))
    assert torch.equal(sink.k[:, 0], bf16(k[:, :bs])) and torch.equal(sink.v[:, 0], bf16(v[:, :bs]))
    staged = cache.gather_dense(0, torch.arange(bs, bs + 3))  # staging block (dense id 1): tokens 16..18
    assert torch.equal(staged[0], bf16(k[:, 16:19])) and torch.equal(staged[1], bf16(v[:, 16:19]))
    # the slot-wise read (prefill contexts) agrees with the block-wise one (decode) bit for bit
    slots = torch.tensor([table[p // bs] * bs + p % bs for p in range(16)])
    by_slot = cache.gather(0, slots)
    by_block = cache.gather_blocks(0, torch.tensor([table[:4]]))
    assert torch.equal(by_slot[0], by_block.k[:, 0]) and torch.equal(by_slot[1], by_block.v[:, 0])


def test_a_step_message_without_staging_blocks_is_refused(model_dir: Path) -> None:
    runner = make_runner(model_dir)
    n = runner.kv_cache.num_blocks
    with pytest.raises(ValueError, match="staging block"):
        runner.run([Chunk(list(range(6)), 0, [n, 1], True)])
    with pytest.raises(ValueError, match="block 0 of each table to be a dense block"):
        runner.run([Chunk(list(range(3)), 0, [1, 2], True, staging=(n,))])


def test_engine_logits_equal_the_simulated_scheme(model_dir: Path) -> None:
    """The engine's cache against benchmarks/kv_schemes.py's simulation of "kv_quant + own + sink"
    (block by block, the sink and each query's own block in bf16) in transformers' forward, with K/V
    rounded to bf16 before they are quantized (the engine quantizes a block from its staged bf16
    values): every position's logits, a prompt prefilled in chunks and then decoded, agree to float
    rounding. Reading every block from fp8 instead (no sink, no staging) moves them ~2,000x more."""
    import transformers
    from transformers import AttentionInterface

    tokens = random_tokens(random.Random(3), 70)
    runner = ModelRunner(model_dir, num_blocks=8, block_size=kv_schemes.BS, kv_dtype="fp8_e4m3")
    table, staging = [8, 1, 2, 3, 4, 5], (9,)
    rows = []
    for start, end in ((0, 21), (21, 50), (50, 66)):
        rows.append(runner.run([Chunk(tokens[start:end], start, table, True, staging=staging, all_logits=True)]))
    for p in range(66, 70):
        rows.append(runner.run([Chunk(tokens[p : p + 1], p, table, True, staging=staging)]))
    ours = torch.cat(rows)  # [70, vocab]

    AttentionInterface.register("kv_schemes", kv_schemes.attention)
    hf = transformers.AutoModelForCausalLM.from_pretrained(model_dir, dtype="float32",
                                                           attn_implementation="kv_schemes").eval()
    scheme = kv_schemes.Scheme(lambda x: kv_schemes.kv_quant_k(bf16(x)), lambda x: kv_schemes.kv_quant_v(bf16(x)),
                               frozenset({"own", "sink"}))
    kv_schemes.ACTIVE[0] = scheme
    try:
        with torch.no_grad():
            ref = hf(torch.tensor([tokens])).logits[0]
    finally:
        kv_schemes.ACTIVE[0] = None
    diff = ((ours - ref).abs().max() / ref.abs().max()).item()
    assert diff < 3e-4, diff  # measured 6.4e-5 (a stored bf16 or fp8 value rounding the other way)
    # the same run without the bf16 blocks (all fp8) is far off: the comparison can tell
    kv_schemes.ACTIVE[0] = kv_schemes.Scheme(scheme.k, scheme.v)
    try:
        with torch.no_grad():
            all_fp8 = hf(torch.tensor([tokens])).logits[0]
    finally:
        kv_schemes.ACTIVE[0] = None
    assert ((all_fp8 - ref).abs().max() / ref.abs().max()).item() > 100 * max(diff, 1e-6)
