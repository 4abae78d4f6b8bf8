"""The paged KV cache: writes and gathers, fp8 quantization, sizes."""

from __future__ import annotations

import random
from pathlib import Path

import pytest
import torch

from gpu_workers.model.config import load_config
from gpu_workers.model.kv_cache import KVCache, kv_bytes_per_token, quantize_fp8
from gpu_workers.model_runner import Chunk, ModelRunner
from tests.gpu_workers.model.hf_models import build, random_tokens, save

# (mantissa bits, exponent of the smallest subnormal) of each fp8 format
FP8 = {"fp8_e4m3": (3, -9), "fp8_e5m2": (2, -16)}


def _cache(kv_dtype: str, **kw: int) -> KVCache:
    shape = {"num_layers": 2, "num_blocks": 6, "block_size": 4, "num_kv_heads": 3, "head_dim": 16} | kw
    return KVCache(kv_dtype=kv_dtype, **shape)


def _awkward_values(t: int, heads: int, d: int) -> torch.Tensor:
    """Vectors spanning 60 orders of magnitude, with outliers, an all-zero one and huge ones."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(t, heads, d, generator=g) * torch.exp(torch.randn(t, heads, 1, generator=g) * 8)
    x[0, 0] = 0.0
    x[1, 1] = 3e38  # near the fp32 max
    x[2, 2, 5] = 1e6  # one outlier among small values
    x[3, 0] = 1e-30
    return x


@pytest.mark.parametrize("kv_dtype", sorted(FP8))
def test_fp8_round_trip_error_bound_and_no_nan(kv_dtype: str) -> None:
    mantissa, min_exp = FP8[kv_dtype]
    cache = _cache(kv_dtype)
    x = _awkward_values(24, 3, 16)
    slots = torch.randperm(24)
    cache.write(1, slots, x, -x)
    k, v = cache.gather(1, slots)  # [Hkv, T, D]
    k, v = k.transpose(0, 1), v.transpose(0, 1)
    assert torch.isfinite(k).all() and torch.isfinite(v).all()
    assert (k[0, 0] == 0).all()
    assert torch.equal(v, -k)
    scale = x.abs().amax(-1, keepdim=True) / torch.finfo(cache.storage_dtype).max
    # round to nearest: half a unit in the last place, relative for normals, absolute for subnormals
    bound = x.abs() * 2.0 ** -(mantissa + 1) + scale * 2.0 ** (min_exp - 1)
    err = (k - x).abs()
    assert (err <= bound * 1.001).all(), f"worst error/bound {(err / bound).max():.3f}"
    assert (err[2, 2] <= 1e6 * 2.0 ** -(mantissa + 1)).all()


@pytest.mark.parametrize("kv_dtype", ["fp32", "bf16", "fp16", "fp8_e4m3", "fp8_e5m2"])
def test_block_gather_matches_slot_gather(kv_dtype: str) -> None:
    cache = _cache(kv_dtype)
    x = torch.randn(24, 3, 16)
    cache.write(0, torch.arange(24), x, x * 2)
    tables = torch.tensor([[5, 1], [2, 2]])
    kv = cache.gather_blocks(0, tables)  # [Hkv, B, 8, D]
    k, v = kv.k, kv.v
    if kv.k_scale is not None:
        k, v = k * kv.k_scale[..., None], v * kv.v_scale[..., None]
    for b, blocks in enumerate(tables.tolist()):
        slots = torch.tensor([blk * 4 + i for blk in blocks for i in range(4)])
        ks, vs = cache.gather(0, slots)
        assert torch.equal(k[:, b], ks) and torch.equal(v[:, b], vs)
    if kv_dtype == "fp32":
        assert torch.equal(k[:, 0, :4], x[20:24].transpose(0, 1))


def test_quantize_zero_and_huge_are_finite() -> None:
    for dtype in (torch.float8_e4m3fn, torch.float8_e5m2):
        q, s = quantize_fp8(torch.tensor([[0.0, 0.0], [3.4e38, -3.4e38], [1e-45, 0.0]]), dtype)
        back = q.float() * s[:, None]
        assert torch.isfinite(back).all() and torch.isfinite(s).all() and (s > 0).all()
        assert back[0].eq(0).all()
        assert torch.allclose(back[1], torch.tensor([3.4e38, -3.4e38]), rtol=0.01)


@pytest.mark.parametrize("kv_dtype,tp", [("fp32", 1), ("bf16", 2), ("fp8_e4m3", 1), ("fp8_e5m2", 4)])
def test_sizes_agree(tmp_path: Path, kv_dtype: str, tp: int) -> None:
    config = load_config(save(build("llama-gqa"), tmp_path))  # 2 layers, 2 KV heads, head_dim 16
    heads = config.kv_heads_per_rank(tp)
    assert heads == max(1, 2 // tp)
    cache = KVCache(num_layers=2, num_blocks=5, block_size=16, num_kv_heads=heads, head_dim=16, kv_dtype=kv_dtype)
    allocated = cache.values.numel() * cache.values.element_size()
    if cache.scales is not None:
        allocated += cache.scales.numel() * cache.scales.element_size()
    assert cache.bytes_per_block() * 5 == allocated
    assert kv_bytes_per_token(config, kv_dtype, tp) * 16 == cache.bytes_per_block()
    fp8 = kv_dtype.startswith("fp8")
    assert kv_bytes_per_token(config, kv_dtype, tp) == 2 * 2 * heads * (16 * cache.values.element_size() + 4 * fp8)


@pytest.mark.parametrize("kv_dtype,rel", [("bf16", 0.02), ("fp16", 0.005), ("fp8_e4m3", 0.1), ("fp8_e5m2", 0.2)])
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
