"""The staged fp8 cache's C kernels (gpu_workers/model/kv_staged_kernels.c) against its torch path
(kv_staged.StagedKVCache with ``fused_kernels=False``) on random caches: reads (``gather``,
``gather_blocks``) bit for bit, decode attention to fp32 rounding, over tables that mix fp8 blocks with
dense (sink and staging) ones, block sizes 16 and 32, batches 1..9, several KV heads and head shards."""

from __future__ import annotations

import pytest
import torch

from gpu_workers.model.decode_backends import gathered_attention
from gpu_workers.model.kv_staged import StagedKVCache, StagedWrites

D, LAYERS, NB, ND = 64, 2, 24, 12


def random_cache(*, heads: int, block_size: int, seed: int = 0, head_dim: int = D) -> StagedKVCache:
    """A staged cache (kernels on) whose every tensor holds random values of its kind: fp8 codes that
    are finite (no NaN codes), positive scales, bf16 dense values."""
    g = torch.Generator().manual_seed(seed)
    cache = StagedKVCache(num_dense_blocks=ND, num_layers=LAYERS, num_blocks=NB, block_size=block_size,
                          num_kv_heads=heads, head_dim=head_dim, kv_dtype="fp8_e4m3")

    def codes(shape: torch.Size) -> torch.Tensor:
        magnitude = torch.randint(0, 0x7F, shape, generator=g, dtype=torch.uint8)  # 0x7f: NaN
        return magnitude | (torch.randint(0, 2, shape, generator=g, dtype=torch.uint8) << 7)

    def scales(shape: torch.Size, dtype: torch.dtype) -> torch.Tensor:
        return torch.rand(shape, generator=g).mul(0.05).add(1e-3).to(dtype)

    cache.values.copy_(codes(cache.values.shape))
    cache.k_centre.copy_(codes(cache.k_centre.shape))
    cache.k_centre_scale.copy_(scales(cache.k_centre_scale.shape, cache.k_centre_scale.dtype))
    cache.k_scale.copy_(scales(cache.k_scale.shape, cache.k_scale.dtype))
    cache.v_scale.copy_(scales(cache.v_scale.shape, cache.v_scale.dtype))
    cache.dense.copy_(torch.randn(cache.dense.shape, generator=g).to(cache.dense.dtype))
    return cache


def torch_twin(cache: StagedKVCache, *, copy: bool = False) -> StagedKVCache:
    """A cache without kernels reading the very same tensors (``copy``: copies of them)."""
    twin = StagedKVCache(num_dense_blocks=cache.num_dense_blocks, num_layers=cache.num_layers,
                         num_blocks=cache.num_blocks, block_size=cache.block_size, num_kv_heads=cache.num_kv_heads,
                         head_dim=cache.head_dim, kv_dtype="fp8_e4m3", fused_kernels=False)
    for name in ("values", "dense", "k_centre", "k_centre_scale", "k_scale", "v_scale"):
        setattr(twin, name, getattr(cache, name).clone() if copy else getattr(cache, name))
    assert twin.staged_kernels is None
    return twin


def staged_tables(batch: int, width: int, *, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Block tables [B, width] as decode steps hold them (entry 0 a dense sink, each sequence's last
    block its dense staging block, fp8 blocks between, padding with block 0) and lengths [B]."""
    g = torch.Generator().manual_seed(seed)
    tables = torch.zeros(batch, width, dtype=torch.int64)
    lens = torch.zeros(batch, dtype=torch.int64)
    for b in range(batch):
        used = int(torch.randint(1, width + 1, (), generator=g))
        tables[b, :used] = torch.randint(0, NB, (used,), generator=g)
        tables[b, 0] = NB + int(torch.randint(0, ND, (), generator=g))
        tables[b, used - 1] = NB + int(torch.randint(0, ND, (), generator=g))
        lens[b] = (used - 1) * BS_OF[0] + int(torch.randint(1, BS_OF[0] + 1, (), generator=g))
    return tables, lens


BS_OF = [16]  # the block size staged_tables sizes lengths by (set per test)


def have_kernels(cache: StagedKVCache) -> None:
    if cache.staged_kernels is None:
        pytest.skip("no C compiler: the kernels cannot be built here")


@pytest.mark.parametrize("block_size", [16, 32])
@pytest.mark.parametrize("heads", [1, 3])
def test_reads_equal_the_torch_path_bit_for_bit(block_size: int, heads: int) -> None:
    cache = random_cache(heads=heads, block_size=block_size)
    have_kernels(cache)
    plain = torch_twin(cache)
    g = torch.Generator().manual_seed(1)
    slots = torch.randint(0, (NB + ND) * block_size, (150,), generator=g)  # fp8 and dense slots mixed
    for layer in range(LAYERS):
        for got, want in zip(cache.gather(layer, slots), plain.gather(layer, slots)):
            assert torch.equal(got, want)
    BS_OF[0] = block_size
    for batch in (1, 4, 9):
        tables, _ = staged_tables(batch, 5, seed=batch)
        got, want = cache.gather_blocks(1, tables), plain.gather_blocks(1, tables)
        assert got.k.shape == (heads, batch, 5 * block_size, D)
        assert torch.equal(got.k, want.k) and torch.equal(got.v, want.v)


def bias_of(lens: torch.Tensor, length: int) -> torch.Tensor:
    hidden = torch.arange(length)[None, :] >= lens[:, None]  # [B, L]
    return torch.zeros(hidden.shape).masked_fill_(hidden, float("-inf"))[None, :, None, :]


@pytest.mark.parametrize("block_size", [16, 32])
@pytest.mark.parametrize("heads,groups", [(1, 1), (3, 3), (2, 4)])
def test_decode_attention_equals_the_gathered_path(block_size: int, heads: int, groups: int) -> None:
    cache = random_cache(heads=heads, block_size=block_size, seed=block_size + heads)
    have_kernels(cache)
    assert cache.fused_attention
    plain = torch_twin(cache)
    BS_OF[0] = block_size
    for batch in range(1, 10):
        tables, lens = staged_tables(batch, 6, seed=100 + batch)
        q = torch.randn(heads, batch, groups, D) * 0.02  # scores of a few units, as a trained model's
        got = cache.decode_attention(1, q, tables, lens)
        want = gathered_attention(plain, 1, q, tables, bias_of(lens, 6 * block_size))
        # fp32 rounding of sums of terms as large as the largest value (codes up to 448 x scales up to 0.05)
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6 * want.abs().max().item())


def test_gemma_head_dim_256() -> None:
    """Gemma 3's head_dim (a library built for it): reads bit for bit, decode attention to fp32 rounding."""
    cache = random_cache(heads=1, block_size=16, seed=11, head_dim=256)
    have_kernels(cache)
    plain = torch_twin(cache)
    BS_OF[0] = 16
    tables, lens = staged_tables(3, 4, seed=5)
    got, want = cache.gather_blocks(0, tables), plain.gather_blocks(0, tables)
    assert torch.equal(got.k, want.k) and torch.equal(got.v, want.v)
    q = torch.randn(1, 3, 4, 256) * 0.01
    want_out = gathered_attention(plain, 0, q, tables, bias_of(lens, 4 * 16))
    torch.testing.assert_close(cache.decode_attention(0, q, tables, lens), want_out, rtol=1e-5,
                               atol=1e-6 * want_out.abs().max().item())


def test_a_head_shard_reads_as_its_heads_of_the_whole_cache() -> None:
    """Tensor parallelism shards the cache by KV head: a rank's cache holding heads 1..2 of 3 computes
    what the whole cache computes for those heads."""
    whole = random_cache(heads=3, block_size=16, seed=7)
    have_kernels(whole)
    shard = StagedKVCache(num_dense_blocks=ND, num_layers=LAYERS, num_blocks=NB, block_size=16, num_kv_heads=2,
                          head_dim=D, kv_dtype="fp8_e4m3")
    shard.values.copy_(whole.values[:, :, 1:])
    shard.dense.copy_(whole.dense[:, :, 1:])
    for name in ("k_centre", "k_centre_scale", "k_scale", "v_scale"):
        getattr(shard, name).copy_(getattr(whole, name)[:, 1:])
    BS_OF[0] = 16
    tables, lens = staged_tables(5, 4, seed=3)
    q = torch.randn(3, 5, 3, D)
    torch.testing.assert_close(shard.decode_attention(0, q[1:], tables, lens),
                               whole.decode_attention(0, q, tables, lens)[1:], rtol=0, atol=0)


def test_bad_ids_are_refused() -> None:
    from gpu_workers.model.fp8_kernels import KernelError  # the staged kernels raise it too

    cache = random_cache(heads=1, block_size=16)
    have_kernels(cache)
    with pytest.raises(KernelError):
        cache.decode_attention(0, torch.randn(1, 1, 1, D), torch.tensor([[NB + ND]]), torch.tensor([3]))
    with pytest.raises(KernelError):
        cache.gather(0, torch.tensor([(NB + ND) * 16]))


STATE = ("values", "dense", "k_centre", "k_centre_scale", "k_scale", "v_scale")


def fresh_kv(tokens: int, heads: int, *, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """New K and V [T, Hkv, D] fp32 with trained-model quirks: per-channel offsets (outlier channels),
    a wide range of magnitudes, exact zeros (an all-zero token), tiny values (fp8 subnormals)."""
    g = torch.Generator().manual_seed(seed)
    k = torch.randn(tokens, heads, D, generator=g) + torch.randn(1, heads, D, generator=g) * 8
    v = torch.randn(tokens, heads, D, generator=g) * torch.rand(tokens, heads, 1, generator=g).pow(4) * 10
    v[0] = 0.0
    k[1, :, :4] = -0.0
    v[2, :, ::3] *= 1e-4
    return k, v


@pytest.mark.parametrize("block_size", [16, 32])
@pytest.mark.parametrize("heads", [1, 3])
def test_writes_equal_the_torch_path_bit_for_bit(block_size: int, heads: int) -> None:
    """A step that completes three blocks (one from staged tokens and new ones, two from new ones
    alone) and stores sink and staging rows: every tensor of the cache, codes and scales, equal."""
    cache = random_cache(heads=heads, block_size=block_size, seed=5)
    have_kernels(cache)
    plain = torch_twin(cache, copy=True)
    bs, t = block_size, 3 * block_size
    k, v = fresh_kv(t, heads, seed=block_size + heads)
    staged = torch.arange(5, dtype=torch.int64) + 2 * bs  # dense block 2 held 5 staged tokens
    src = torch.cat((t + torch.arange(5), torch.arange(bs - 5), torch.arange(bs - 5, 2 * bs - 5),
                     torch.randperm(t, generator=torch.Generator().manual_seed(0))[:bs]))
    plan = StagedWrites(
        dense_rows=torch.arange(2 * bs - 5, t), dense_slots=torch.arange(2 * bs, 3 * bs + 5),  # over the staged tokens read
        complete_blocks=torch.tensor([7, 3, 20]), complete_src=src, staged_slots=staged,
        late_rows=torch.zeros(0, dtype=torch.int64), late_slots=torch.zeros(0, dtype=torch.int64))
    for c in (cache, plain):
        c.write_staged(1, plan, k, v)
    for name in STATE:
        assert torch.equal(getattr(cache, name), getattr(plain, name)), name
    assert not torch.equal(cache.values[1], random_cache(heads=heads, block_size=block_size, seed=5).values[1])
