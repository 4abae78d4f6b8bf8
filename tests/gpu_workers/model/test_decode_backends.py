"""Decode backends: each cache gets its backends once, by its format, device and kernels; every
backend that can read a cache computes the same attention from the same decode group; a new
backend is one class and one entry in the list."""

from __future__ import annotations

from typing import Any

import pytest
import torch

from gpu_workers.model import decode_backends
from gpu_workers.model.decode_backends import (
    DECODE_BACKENDS,
    DecodeBackends,
    DecodeSpan,
    FusedDecode,
    GatheredDecode,
    GatheredMetadata,
)
from gpu_workers.model.kv_cache import KVCache
from gpu_workers.model.kv_staged import StagedKVCache

BS, HKV, G, D = 4, 2, 3, 16


def cache_of(kv_dtype: str, *, fused: bool = True) -> KVCache:
    return KVCache(num_layers=2, num_blocks=12, block_size=BS, num_kv_heads=HKV, head_dim=D, kv_dtype=kv_dtype,
                   fused_kernels=fused)


def names(cache: KVCache) -> tuple[str, str]:
    chosen = DecodeBackends.choose(cache, queries_per_kv_head=G, group_tokens=None)
    return chosen.full.name, chosen.windowed.name


@pytest.mark.parametrize("kv_dtype,fused,expected", [
    ("fp32", True, ("fused", "in-place")),
    ("fp32", False, ("in-place", "in-place")),
    ("bf16", True, ("gathered", "gathered")),
    ("fp16", True, ("gathered", "gathered")),
    ("fp8_e4m3_block", True, ("fused", "gathered")),
    ("fp8_e5m2", False, ("gathered", "gathered")),
    ("fp8_e4m3_per_tensor", True, ("fused", "gathered")),
    ("fp8_e4m3_per_token", True, ("gathered", "gathered")),
])
def test_a_cache_gets_its_backends_by_format_and_kernels(kv_dtype: str, fused: bool, expected: tuple[str, str]) -> None:
    cache = cache_of(kv_dtype, fused=fused)
    if fused and cache.kernels is None and expected[0] == "fused":
        pytest.skip("no C compiler: the fused kernels cannot be built here")
    assert names(cache) == expected


def spans() -> list[DecodeSpan]:
    """Two sequences over shuffled blocks: full attention (one shorter, padded) and a window's view."""
    tables = torch.tensor([[7, 2, 9, 4], [5, 11, 0, 0]])  # [B, MB], the second padded with block 0
    positions = torch.tensor([15, 6])  # 16 and 7 tokens of context, the new one included
    full = DecodeSpan(0, tables, positions)
    # window 6: keys 10..15 (blocks 2 and 3 of the first) and 1..6 (blocks 0 and 1 of the second)
    window = DecodeSpan(0, torch.tensor([[9, 4], [5, 11]]), positions,
                        key_start=torch.tensor([[8], [0]]), window=6)
    return [full, window]


def reference(cache: KVCache, layer: int, q: torch.Tensor, span: DecodeSpan) -> torch.Tensor:
    """Attention [Hkv, B, G, D] computed sequence by sequence from the slots each query sees."""
    out = torch.empty_like(q)
    for b, pos in enumerate(span.positions.tolist()):
        first = 0 if span.window is None else max(0, pos - span.window + 1)
        start = 0 if span.key_start is None else int(span.key_start[b])
        keys = range(first, pos + 1)
        slots = torch.tensor([int(span.block_tables[b, (k - start) // BS]) * BS + (k - start) % BS for k in keys])
        k, v = cache.gather(layer, slots)  # [Hkv, S, D]
        probs = torch.softmax(q[:, b] @ k.transpose(-1, -2), dim=-1)  # [Hkv, G, S]
        out[:, b] = probs @ v
    return out


@pytest.mark.parametrize("kv_dtype", ["fp32", "bf16", "fp8_e4m3_block", "fp8_e4m3_per_tensor", "fp8_e4m3_per_token"])
def test_every_backend_reads_the_attention_its_metadata_describes(kv_dtype: str) -> None:
    torch.manual_seed(0)
    x = torch.randn(12 * BS, HKV, D)
    q = torch.randn(HKV, 2, G, D)
    caches = [cache_of(kv_dtype), cache_of(kv_dtype, fused=False)]
    for cache in caches:
        cache.write(1, torch.arange(12 * BS), x, x.flip(0) * 2)
    read = 0
    for cache in caches:
        for backend_class in DECODE_BACKENDS:
            if not backend_class.supports(cache):
                continue
            backend = backend_class(cache, queries_per_kv_head=G, group_tokens=None)
            for span in spans():
                if span.window is not None and not backend.reads_windows:
                    continue
                out = backend.decode(1, q, backend.build(span))
                torch.testing.assert_close(out, reference(cache, 1, q, span), rtol=1e-4, atol=1e-4,
                                           msg=lambda m, b=backend.name: f"{kv_dtype} {b}: {m}")
                read += 1
    assert read >= 2  # the gathered backend reads every cache, windowed or not


def test_decode_groups_split_by_the_budget_but_the_fused_kernel_takes_all() -> None:
    cache = cache_of("fp32", fused=False)
    widths = [1, 1, 2, 3, 3, 5]
    gathered = GatheredDecode(cache, queries_per_kv_head=G, group_tokens=24)  # 6 blocks of 4 per group
    assert gathered.split(widths) == [(0, 3), (3, 2), (5, 1)]
    assert GatheredDecode(cache, queries_per_kv_head=G, group_tokens=None).split(widths) == [(0, 6)]
    assert FusedDecode(cache, queries_per_kv_head=G, group_tokens=24).split(widths) == [(0, 6)]
    assert gathered.split([]) == []


@pytest.mark.parametrize("fused", [True, False])
def test_the_staged_cache_s_c_kernel_takes_all_its_full_attention_decodes_in_one_group(fused: bool) -> None:
    """As FusedDecode's (padding costs its kernel nothing), and so the fused decoder's C attention
    (one step struct per KV cache group) serves a large batch too; its sliding-window views and the
    torch reads (no kernels) split by the budget."""
    cache = StagedKVCache(num_layers=2, num_blocks=12, block_size=BS, num_kv_heads=HKV, head_dim=D,
                          kv_dtype="fp8_e4m3", num_dense_blocks=8, fused_kernels=fused)
    if fused and not cache.fused_attention:
        pytest.skip("no C compiler: no staged kernels")
    backends = DecodeBackends.choose(cache, queries_per_kv_head=G, group_tokens=24)
    widths = [1, 1, 2, 3, 3, 5]
    assert backends.full.split(widths) == ([(0, 6)] if fused else [(0, 3), (3, 2), (5, 1)])
    assert backends.windowed.split(widths) == [(0, 3), (3, 2), (5, 1)]


def test_a_new_backend_is_one_class_and_one_entry(monkeypatch: pytest.MonkeyPatch) -> None:
    """A backend registered ahead of the others reads the caches it supports, full and windowed views."""
    calls: list[int] = []

    class Recording(GatheredDecode):
        name = "recording"

        @classmethod
        def supports(cls, cache: KVCache) -> bool:
            return cache.format.name == "bf16"

        def decode(self, layer: int, q: torch.Tensor, meta: GatheredMetadata) -> torch.Tensor:
            calls.append(layer)
            return super().decode(layer, q, meta)

    registry: tuple[type[Any], ...] = (Recording, *DECODE_BACKENDS)
    monkeypatch.setattr(decode_backends, "DECODE_BACKENDS", registry)
    assert names(cache_of("bf16")) == ("recording", "recording")
    assert names(cache_of("fp32", fused=False)) == ("in-place", "in-place")
    backends = DecodeBackends.choose(cache_of("bf16"), queries_per_kv_head=G, group_tokens=None)
    backends.full.decode(1, torch.randn(HKV, 2, G, D), backends.full.build(spans()[0]))
    assert calls == [1]
