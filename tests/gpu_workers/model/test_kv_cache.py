"""The paged KV cache: writes and reads in every format, per-block fp8 scales as blocks fill, sizes."""

from __future__ import annotations

import random
from pathlib import Path

import pytest
import torch

from gpu_workers.model.config import load_config
from gpu_workers.model.fp8 import code_values, pow2_scale
from gpu_workers.model.kv_cache import KV_FORMATS, KVCache, kv_bytes_per_block, kv_bytes_per_token
from gpu_workers.model_runner import Chunk, ModelRunner
from tests.gpu_workers.model.hf_models import build, random_tokens, save

FP8 = ["fp8_e4m3_block", "fp8_e5m2", "fp8_e4m3_per_tensor", "fp8_e4m3_per_token"]
ALL = ["fp32", "bf16", "fp16", *FP8]
E4M3_HALF_ULP = 2.0**-4


def make_cache(kv_dtype: str, *, fused: bool = True, **kw: int) -> KVCache:
    shape = {"num_layers": 2, "num_blocks": 6, "block_size": 4, "num_kv_heads": 3, "head_dim": 16} | kw
    return KVCache(kv_dtype=kv_dtype, fused_kernels=fused, **shape)


def slots_of(blocks: list[int], bs: int = 4) -> torch.Tensor:
    return torch.tensor([b * bs + i for b in blocks for i in range(bs)])


# --- per-block fp8 scales --------------------------------------------------------------------------


@pytest.mark.parametrize("fused", [True, False], ids=["kernels", "torch"])
def test_token_by_token_equals_all_at_once(fused: bool) -> None:
    """Growing a block's scale as tokens arrive rescales the earlier codes exactly: a block filled
    one token at a time (scales rising) holds the same codes as one written whole. Exact for codes
    that stay clear of fp8's subnormals (a rescale there drops bits; about 5% of unseeded draws of
    these values reach them), so the values are seeded."""
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(12, 3, 16, generator=gen) * torch.logspace(-2, 2, 12)[:, None, None]  # later tokens larger
    slots = slots_of([3, 0, 5])
    whole, stepwise = make_cache("fp8_e4m3_block", fused=fused), make_cache("fp8_e4m3_block", fused=fused)
    whole.write(1, slots, x, -x)
    for t in range(12):
        stepwise.write(1, slots[t : t + 1], x[t : t + 1], -x[t : t + 1])
    assert torch.equal(whole.values, stepwise.values) and torch.equal(whole.scales, stepwise.scales)
    k, v = stepwise.gather(1, slots)
    assert torch.equal(v, -k)
    block_scales = pow2_scale(x.view(3, 4, 3, 16).abs().amax(dim=(1, 3)), torch.float8_e4m3fn)  # [3 blocks, Hkv]
    assert torch.equal(stepwise.scales[1, 0][:, [3, 0, 5]], block_scales.t())
    err = (k.transpose(0, 1) - x).abs()
    assert (err <= x.abs() * E4M3_HALF_ULP + block_scales.repeat_interleave(4, 0)[..., None] * 2.0**-10).all()


def test_a_block_written_from_its_first_slot_starts_afresh() -> None:
    """A freed block keeps its last owner's codes and scale; its next owner's first write must not
    inherit that scale (tiny values under a huge scale would all round to zero)."""
    cache = make_cache("fp8_e4m3_block")
    cache.write(0, slots_of([2]), torch.full((4, 3, 16), 1e4), torch.full((4, 3, 16), 1e4))
    small = torch.randn(2, 3, 16) * 1e-3
    cache.write(0, slots_of([2])[:2], small, small)
    k, _ = cache.gather(0, slots_of([2])[:2])
    assert torch.allclose(k.transpose(0, 1), small, rtol=E4M3_HALF_ULP, atol=0)
    assert (cache.scales[0, 0, :, 2] < 1e-4).all()


def test_writes_never_touch_other_blocks() -> None:
    """Full blocks shared through the prefix cache are never written again; a later block growing
    its scale (a huge token) must leave their codes and scales alone."""
    cache = make_cache("fp8_e4m3_block")
    cache.write(0, slots_of([4, 1]), torch.randn(8, 3, 16), torch.randn(8, 3, 16))
    values, scales = cache.values.clone(), cache.scales.clone()
    cache.write(0, slots_of([0])[:1], torch.randn(1, 3, 16), torch.randn(1, 3, 16))
    cache.write(0, slots_of([0])[1:2], torch.full((1, 3, 16), 1e5), torch.full((1, 3, 16), -1e5))
    changed_slots = (cache.values != values).any(dim=-1).nonzero()[:, 3].unique()
    assert set(changed_slots.tolist()) <= {0, 1}
    changed_blocks = (cache.scales != scales).nonzero()[:, 3].unique()
    assert changed_blocks.tolist() == [0]


def test_rescaling_keeps_earlier_tokens_within_the_new_scales_bound() -> None:
    cache = make_cache("fp8_e5m2")
    first = torch.randn(1, 3, 16)
    cache.write(0, torch.tensor([8]), first, first)
    cache.write(0, torch.tensor([9]), first * 1000, first * 1000)  # scale grows ~1000x (2^10)
    k, _ = cache.gather(0, torch.tensor([8, 9]))
    scale = cache.scales[0, 0, :, 2]  # block 2, per head
    err = (k[:, 0] - first[0]).abs()
    # e5m2: relative half-ulp 2^-3 for normals, absolute 2^-17 x scale below the smallest normal
    assert (err <= first[0].abs() * 2.0**-3 + scale[:, None] * 2.0**-17).all()


def test_per_tensor_scales_are_static() -> None:
    cache = make_cache("fp8_e4m3_per_tensor")
    assert cache.scales.shape == (2, 2) and (cache.scales == 1.0).all()
    x = torch.tensor([1000.0, 1.0, 1e-3]).repeat(16 * 3 // 3 + 1)[:48].view(1, 3, 16)
    cache.write(0, torch.tensor([5]), x, x)
    k, _ = cache.gather(0, torch.tensor([5]))
    assert (cache.scales == 1.0).all()
    assert k.max() == 448.0  # saturated: what makes static scales corrupt outliers


# --- reads --------------------------------------------------------------------------------------


@pytest.mark.parametrize("kv_dtype", ALL)
def test_block_gather_matches_slot_gather(kv_dtype: str) -> None:
    cache = make_cache(kv_dtype)
    x = torch.randn(24, 3, 16) * 3
    cache.write(0, torch.arange(24), x, x * 2)
    tables = torch.tensor([[5, 1], [2, 2]])
    kv = cache.gather_blocks(0, tables)  # [Hkv, B, 8, D]
    k, v = kv.k, kv.v
    if kv.k_scale is not None:
        scale_k, scale_v = (s[:, :, 0, :, None] if s.dim() else s for s in (kv.k_scale, kv.v_scale))
        k, v = k * scale_k, v * scale_v
    for b, blocks in enumerate(tables.tolist()):
        ks, vs = cache.gather(0, slots_of(blocks))
        torch.testing.assert_close(k[:, b], ks, rtol=1e-6, atol=0)
        torch.testing.assert_close(v[:, b], vs, rtol=1e-6, atol=0)
    if kv_dtype == "fp32":
        assert torch.equal(k[:, 0, :4], x[20:24].transpose(0, 1))


@pytest.mark.parametrize("kv_dtype", ["fp32", "fp8_e4m3_block", "fp8_e5m2", "fp8_e4m3_per_tensor"])
def test_fused_attention_matches_the_gathered_path(kv_dtype: str) -> None:
    fused = make_cache(kv_dtype, block_size=16, head_dim=64, num_kv_heads=2)
    if not fused.fused_attention:
        pytest.skip("no C compiler: the fused kernels cannot be built here")
    plain = make_cache(kv_dtype, block_size=16, head_dim=64, num_kv_heads=2, fused=False)
    x = torch.randn(96, 2, 64)
    for cache in (fused, plain):
        cache.write(1, torch.arange(96), x, x.flip(0))
    tables = torch.tensor([[4, 0, 2], [1, 5, 0]])
    q = torch.randn(2, 2, 3, 64)  # [Hkv, B, G, D]
    out = fused.decode_attention(1, q, tables, torch.tensor([48, 40]))
    bias = torch.zeros(1, 2, 1, 48)
    bias[:, 1, :, 40:] = float("-inf")
    kv = plain.gather_blocks(1, tables)
    scores = q @ kv.k.transpose(-1, -2)
    probs = torch.softmax(scores * (kv.k_scale if kv.k_scale is not None else 1) + bias, dim=-1)
    expected = (probs * (kv.v_scale if kv.v_scale is not None else 1)) @ kv.v
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)


# --- sizes --------------------------------------------------------------------------------------


@pytest.mark.parametrize("kv_dtype,tp", [("fp32", 1), ("bf16", 2), ("fp8_e4m3_block", 1), ("fp8_e5m2", 4),
                                         ("fp8_e4m3_per_tensor", 1), ("fp8_e4m3_per_token", 2)])
def test_sizes_agree(tmp_path: Path, kv_dtype: str, tp: int) -> None:
    config = load_config(save(build("llama-gqa"), tmp_path))  # 2 layers, 2 KV heads, head_dim 16
    heads = config.kv_heads_per_rank(tp)
    assert heads == max(1, 2 // tp)
    cache = KVCache(num_layers=2, num_blocks=5, block_size=16, num_kv_heads=heads, head_dim=16, kv_dtype=kv_dtype)
    per_block = cache.values.numel() * cache.values.element_size() // 5
    if cache.scales is not None and KV_FORMATS[kv_dtype].scale != "tensor":  # per-tensor: 8 bytes a layer, not per block
        per_block += cache.scales.numel() * cache.scales.element_size() // 5
    assert cache.bytes_per_block() == per_block == kv_bytes_per_block(config, kv_dtype, block_size=16, tp_size=tp)
    element = {"fp32": 4, "bf16": 2}.get(kv_dtype, 1)
    scale_bytes = {"fp8_e4m3_block": 4, "fp8_e5m2": 4, "fp8_e4m3_per_token": 4 * 16}.get(kv_dtype, 0)
    assert per_block == 2 * 2 * heads * (16 * 16 * element + scale_bytes)
    assert kv_bytes_per_token(config, kv_dtype, tp) == per_block / 16


def test_per_block_scales_cost_a_quarter_byte_per_token_per_head(tmp_path: Path) -> None:
    config = load_config(save(build("llama-gqa"), tmp_path))
    per_layer_head_kv = kv_bytes_per_token(config, "fp8_e4m3_block") / (2 * 2 * 2)  # layers x K/V x heads
    assert per_layer_head_kv == 16 + 0.25
    ratio = kv_bytes_per_token(config, "fp32") / kv_bytes_per_token(config, "fp8_e4m3_block")
    assert ratio > 3.9 and kv_bytes_per_token(config, "bf16") / kv_bytes_per_token(config, "fp8_e4m3_block") > 1.95


# --- through the model --------------------------------------------------------------------------


@pytest.mark.parametrize("kv_dtype,rel", [("bf16", 0.02), ("fp16", 0.005), ("fp8_e4m3_block", 0.1), ("fp8_e5m2", 0.2),
                                          ("fp8_e4m3_per_tensor", 0.1), ("fp8_e4m3_per_token", 0.1)])
def test_low_precision_cache_logits_close_to_fp32(tmp_path: Path, kv_dtype: str, rel: float) -> None:
    """Decode logits with a compressed cache stay near the fp32-cache ones (loose bound)."""
    path = save(build("llama-gqa"), tmp_path)
    rng = random.Random(0)
    prompts = [random_tokens(rng, n) for n in (20, 9)]
    tables = [[0, 1, 2, 3, 4, 5], [6, 7, 8, 9]]
    runners = {d: ModelRunner(path, num_blocks=10, block_size=4, kv_dtype=d) for d in ("fp32", kv_dtype)}
    logits = {d: [r.run([Chunk(p, 0, t, True) for p, t in zip(prompts, tables)])] for d, r in runners.items()}
    for step in range(4):
        token = rng.randrange(300)
        for d, r in runners.items():
            logits[d].append(r.run([Chunk([token], len(p) + step, t, True) for p, t in zip(prompts, tables)]))
    ref, got = torch.stack(logits["fp32"][1:]), torch.stack(logits[kv_dtype][1:])
    diff = (got - ref).abs().max().item()
    scale = ref.abs().max().item()
    assert torch.isfinite(got).all()
    assert 0 < diff <= rel * scale, f"{kv_dtype}: max abs diff {diff:.3g} vs logit scale {scale:.3g}"


def test_prefill_reads_fp8_context_like_decode(tmp_path: Path) -> None:
    """A chunk continuing cached fp8 context (prefix hit, chunked prefill) reads the same values
    decode does: prefilling a prompt in chunks gives the logits of decoding it token by token."""
    path = save(build("llama-gqa"), tmp_path)
    prompt = random_tokens(random.Random(3), 21)
    table = list(range(6))
    chunked = ModelRunner(path, num_blocks=6, block_size=4, kv_dtype="fp8_e4m3_block")
    stepped = ModelRunner(path, num_blocks=6, block_size=4, kv_dtype="fp8_e4m3_block")
    chunked.run([Chunk(prompt[:1], 0, table, False)])
    got = chunked.run([Chunk(prompt[1:], 1, table, True)])
    for i in range(len(prompt)):
        expected = stepped.run([Chunk([prompt[i]], i, table, True)])
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)
    assert torch.equal(chunked.kv_cache.values, stepped.kv_cache.values)


def test_code_values_of_a_gather_are_finite_after_reuse() -> None:
    """Stale slots of a reused block (codes from an earlier owner) stay finite under any scale."""
    cache = make_cache("fp8_e4m3_block")
    cache.write(0, slots_of([1]), torch.full((4, 3, 16), 3e38), torch.full((4, 3, 16), -3e38))
    cache.write(0, slots_of([1])[:1], torch.full((1, 3, 16), 1e-30), torch.zeros(1, 3, 16))
    kv = cache.gather_blocks(0, torch.tensor([[1]]))
    assert torch.isfinite(kv.k * kv.k_scale[:, :, 0, :, None]).all()
    assert torch.isfinite(code_values(cache.values, torch.float8_e4m3fn, torch.float32)).all()
