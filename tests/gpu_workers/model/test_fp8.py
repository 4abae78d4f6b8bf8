"""fp8 numerics (power-of-two scales, quantization, code values) and the fused CPU kernels."""

from __future__ import annotations

import logging

import pytest
import torch

from gpu_workers.model import fp8_kernels
from gpu_workers.model.fp8 import FP8_MAX, MIN_SCALE, code_values, pow2_scale, quantize, quantize_per_vector

E4M3, E5M2 = torch.float8_e4m3fn, torch.float8_e5m2
# (mantissa bits, exponent of the smallest subnormal) of each format
SPEC = {E4M3: (3, -9), E5M2: (2, -16)}
FORMATS = pytest.mark.parametrize("dtype", [E4M3, E5M2], ids=["e4m3", "e5m2"])


def awkward_values(n: int, d: int) -> torch.Tensor:
    """Rows spanning ~70 orders of magnitude: normal values, subnormal-range ones, zeros, outliers."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, d, generator=g) * torch.exp(torch.randn(n, 1, generator=g) * 8)
    x[0] = 0.0
    x[1, 3] = 1e6  # one outlier among values of ~1
    x[1, :3] = 1e-3
    x[2] = 1e-30
    x[3, ::2] = 1e38  # near the fp32 max
    x[4, 5] = 1e-40  # an fp32 subnormal
    return x


def bound(x: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Round-to-nearest error bound: half a unit in the last place, relative for normals, absolute
    (scale x the smallest subnormal / 2) for subnormals."""
    mantissa, min_exp = SPEC[dtype]
    return x.abs() * 2.0 ** -(mantissa + 1) + scale * 2.0 ** (min_exp - 1)


def test_pow2_scale_is_the_smallest_power_of_two_that_fits() -> None:
    amax = torch.tensor([0.0, 1e-45, 1.0, 448.0, 449.0, 448.0 * 2**-3, 1e30, 3.4e38, float("inf")])
    s = pow2_scale(amax, E4M3)
    mantissa, _ = torch.frexp(s)
    assert (mantissa == 0.5).all(), "not powers of two"
    assert torch.equal(s[:2], torch.full((2,), MIN_SCALE))
    fits = amax[2:7]
    assert (fits / s[2:7] <= 448).all() and (fits / (s[2:7] / 2) > 448).all()
    assert s[3] == 1.0 and s[4] == 2.0 and s[5] == 2**-3
    # inputs are clamped to 2^127 first (so that no code times its scale passes the fp32 max)
    assert torch.isfinite(s).all() and s[-1] == s[-2] == 2.0**127 / 256


@FORMATS
def test_round_trip_error_bounds_with_block_scales(dtype: torch.dtype) -> None:
    x = awkward_values(32, 16)
    scale = pow2_scale(x.abs().amax(-1), dtype)[:, None]
    codes = quantize(x, scale, dtype)
    back = code_values(codes, dtype, torch.float32) * scale
    assert codes.dtype == torch.uint8 and torch.isfinite(back).all()
    assert (back[0] == 0).all() and (back[2] > 0).all()  # zeros stay zero; tiny values keep their own scale
    err, limit = (back - x).abs(), bound(x, scale, dtype)
    assert (err <= limit * 1.0001).all(), f"worst error/bound {(err / limit).max():.3f}"
    # the outlier sets its row's scale: the small values there lose their bits (absolute bound) and no more
    assert err[1, 3] <= 1e6 * 2.0 ** -(SPEC[dtype][0] + 1)


@FORMATS
def test_round_trip_error_bounds_with_vector_scales(dtype: torch.dtype) -> None:
    x = awkward_values(32, 16)
    codes, scale = quantize_per_vector(x, dtype)
    back = code_values(codes, dtype, torch.float32) * scale[:, None]
    assert torch.isfinite(back).all() and (scale > 0).all()
    err = (back - x).abs()
    assert (err <= bound(x, scale[:, None], dtype) * 1.0001).all()
    assert torch.allclose(back[2], x[2], rtol=0.07)  # its own scale: 1e-30 survives


@FORMATS
def test_saturation_never_makes_nan_or_inf(dtype: torch.dtype) -> None:
    x = torch.tensor([[3.4e38, -3.4e38, 1e-45, 0.0, -0.0, 5e4, 1e5]])
    for scale in (torch.tensor(1.0), pow2_scale(x.abs().amax(-1), dtype)):  # static 1.0 saturates at fp8 max
        back = code_values(quantize(x, scale, dtype), dtype, torch.float32) * scale
        assert torch.isfinite(back).all()
        assert back[0, 0] > 0 > back[0, 1]
    static = code_values(quantize(x, torch.tensor(1.0), dtype), dtype, torch.float32)
    assert static[0, 0] == static[0, -1] == FP8_MAX[dtype] == -static[0, 1]


@FORMATS
def test_rescaling_by_a_power_of_two_is_exact(dtype: torch.dtype) -> None:
    g = torch.Generator().manual_seed(0)
    # magnitudes in [0.5, 3]: a quarter of each code stays clear of the subnormals, where a 4x
    # coarser scale would (rightly) round
    x = (torch.rand(64, 16, generator=g) * 2.5 + 0.5) * torch.randn(64, 16, generator=g).sign()
    scale = pow2_scale(x.abs().amax(), dtype)
    codes = quantize(x, scale, dtype)
    values = code_values(codes, dtype, torch.float32)
    # what growing a block's scale 4x does to its codes
    rescaled = quantize(values / 4, torch.tensor(1.0), dtype)
    assert torch.equal(code_values(rescaled, dtype, torch.float32) * (scale * 4), values * scale)


@FORMATS
def test_code_values_table_matches_the_cast(dtype: torch.dtype) -> None:
    codes = torch.arange(256, dtype=torch.uint8)
    cast = codes.view(dtype).float()
    ok = torch.isfinite(cast)
    assert torch.equal(code_values(codes, dtype, torch.float32)[ok], cast[ok])
    kernels = fp8_kernels.load(16, 4)
    if kernels is not None:
        rows = codes.view(16, 16)
        scales = torch.full((16,), 0.25)
        got = kernels.dequantize_rows(rows, scales, dtype).view(-1)
        assert torch.equal(got[ok], cast[ok] * 0.25)


# --- fused kernels -------------------------------------------------------------------------------


def dequantized_blocks(codes: torch.Tensor, scales: torch.Tensor, tables: torch.Tensor,
                       dtype: torch.dtype) -> torch.Tensor:
    """The values [Hkv, B, MB * bs, D] of the blocks ``tables`` [B, MB] lists, dequantized with torch."""
    heads, num_blocks, bs, d = codes.shape
    b, mb = tables.shape
    ids = tables.reshape(-1)
    block_scales = scales.expand(heads, num_blocks)[:, ids]  # [Hkv, B * MB]
    values = code_values(codes[:, ids], dtype, torch.float32) * block_scales[..., None, None]
    return values.view(heads, b, mb * bs, d)


def need_kernels(head_dim: int, block_size: int) -> fp8_kernels.Fp8Kernels:
    kernels = fp8_kernels.load(head_dim, block_size)
    if kernels is None:
        pytest.skip("no C compiler: the fused kernels cannot be built here")
    return kernels


@FORMATS
@pytest.mark.parametrize("head_dim,block_size,groups", [(64, 16, 4), (32, 16, 1), (16, 4, 3), (24, 16, 2)])
@pytest.mark.parametrize("per_tensor", [False, True], ids=["block-scales", "one-scale"])
def test_fused_fp8_attention_matches_torch(dtype: torch.dtype, head_dim: int, block_size: int, groups: int,
                                           per_tensor: bool) -> None:
    kernels = need_kernels(head_dim, block_size)
    g = torch.Generator().manual_seed(1)
    heads, num_blocks = 2, 9
    pools = []
    for _ in range(2):  # K, V: blocks of different magnitudes
        x = torch.randn(heads, num_blocks, block_size, head_dim, generator=g) * torch.rand(
            heads, num_blocks, 1, 1, generator=g) * 5
        scales = torch.tensor(0.5) if per_tensor else pow2_scale(x.abs().amax((-1, -2)), dtype)  # [Hkv, NB]
        pools.append((quantize(x, scales if per_tensor else scales[..., None, None], dtype).contiguous(), scales))
    (k_codes, k_scales), (v_codes, v_scales) = pools
    tables = torch.tensor([[4, 0, 8], [2, 2, 7], [5, 1, 3]])
    lens = torch.tensor([3 * block_size, 1, 2 * block_size + 1])  # whole, one token, mid-block
    q = torch.randn(heads, 3, groups, head_dim, generator=g) * head_dim**-0.5
    keys = dequantized_blocks(k_codes, k_scales, tables, dtype)  # [Hkv, B, L, D]
    values = dequantized_blocks(v_codes, v_scales, tables, dtype)
    out = kernels.decode_attention(k_codes, v_codes, k_scales, v_scales, tables, lens, q, dtype, torch.empty_like(q))
    for b, n in enumerate(lens.tolist()):
        ref = torch.softmax(q[:, b] @ keys[:, b, :n].transpose(-1, -2), dim=-1) @ values[:, b, :n]
        torch.testing.assert_close(out[:, b], ref, rtol=1e-5, atol=1e-5 * ref.abs().max().item())


@pytest.mark.parametrize("lens", [[40, 7], [600, 1, 17, 600, 600, 600, 600, 600]], ids=["one-thread", "threads"])
def test_fused_attention_runs_long_contexts_on_threads_and_short_ones_on_one(lens: list[int]) -> None:
    """Below SERIAL_ROWS (4096) K rows of all heads the kernel keeps to one thread, from there on it
    splits (head, sequence) pairs between threads: both give the reference's values, also fp32 pools."""
    kernels = need_kernels(64, 16)
    g = torch.Generator().manual_seed(2)
    heads, width = 2, -(-max(lens) // 16)
    tables = torch.randperm(len(lens) * width, generator=g).view(len(lens), width)
    k, v = (torch.randn(heads, len(lens) * width, 16, 64, generator=g) for _ in range(2))
    q = torch.randn(heads, len(lens), 3, 64, generator=g) * 0.125
    assert (sum(lens) * heads >= 4096) == (len(lens) > 2)
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        out = kernels.decode_attention(k, v, None, None, tables, torch.tensor(lens), q, torch.float32,
                                       torch.empty_like(q))
    finally:
        torch.set_num_threads(before)
    keys, values = (x[:, tables.reshape(-1)].view(heads, len(lens), width * 16, 64) for x in (k, v))
    for b, n in enumerate(lens):
        ref = torch.softmax(q[:, b] @ keys[:, b, :n].transpose(-1, -2), dim=-1) @ values[:, b, :n]
        torch.testing.assert_close(out[:, b], ref, rtol=1e-5, atol=1e-5 * ref.abs().max().item())


def test_kernels_refuse_blocks_outside_the_pool_and_bad_shapes() -> None:
    kernels = need_kernels(16, 4)
    codes = torch.zeros(2, 5, 4, 16, dtype=torch.uint8)
    scales = torch.ones(2, 5)
    q = torch.randn(2, 1, 2, 16)

    def attend(tables: list[list[int]], lens: list[int], query: torch.Tensor = q) -> torch.Tensor:
        return kernels.decode_attention(codes, codes, scales, scales, torch.tensor(tables), torch.tensor(lens),
                                        query, E4M3, torch.empty_like(query))

    for tables, lens in (([[0, 5]], [8]), ([[-1, 0]], [8]), ([[0, 1]], [9]), ([[0, 1]], [0])):
        with pytest.raises(fp8_kernels.KernelError):
            attend(tables, lens)
    with pytest.raises(ValueError):
        attend([[0, 1]], [8], q.double())
    with pytest.raises(ValueError):
        attend([[0, 1]], [8, 8])  # a length per sequence
    assert (attend([[0, 4]], [8]) == 0).all()  # all-zero V: zero out, whatever the scores


def test_no_compiler_means_no_kernels_and_a_warning(monkeypatch: pytest.MonkeyPatch,
                                                    caplog: pytest.LogCaptureFixture) -> None:
    monkeypatch.setenv("CC", "/nonexistent/cc")
    with caplog.at_level(logging.WARNING, logger="gpu_workers.model.fp8_kernels"):
        assert fp8_kernels.load.__wrapped__(16, 4) is None
    assert "falling back to torch" in caplog.text


def test_libraries_are_cached_per_shape(tmp_path: object, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("RYZ_CACHE_DIR", str(tmp_path))
    need_kernels(16, 4)
    first = fp8_kernels._build(16, 4)
    assert fp8_kernels._build(16, 4) == first and first.exists()
    assert fp8_kernels._build(32, 4) != first


# --- the fused fp32 decode attention (same library) -------------------------------------------------


# head_dim 20: not a multiple of 8, so the kernel's plain loops rather than its 8-float vectors
@pytest.mark.parametrize("head_dim,block_size,groups", [(64, 16, 4), (32, 16, 1), (16, 4, 3), (20, 16, 2)])
def test_fused_fp32_attention_matches_torch_at_every_length(head_dim: int, block_size: int, groups: int) -> None:
    kernels = need_kernels(head_dim, block_size)
    gen = torch.Generator().manual_seed(3)
    heads, num_blocks, batch, width = 2, 40, 5, 6
    k_pool = torch.randn(heads, num_blocks, block_size, head_dim, generator=gen)
    v_pool = torch.randn(heads, num_blocks, block_size, head_dim, generator=gen)
    tables = torch.randperm(num_blocks, generator=gen)[: batch * width].view(batch, width).contiguous()
    # lengths from one token to every slot of the table, some ending mid-block
    lens = torch.tensor([1, block_size, block_size + 1, width * block_size - 3, width * block_size])
    q = torch.randn(heads, batch, groups, head_dim, generator=gen) * head_dim**-0.5
    out = kernels.decode_attention(k_pool, v_pool, None, None, tables, lens, q, torch.float32, torch.empty_like(q))
    for b in range(batch):
        n = int(lens[b])
        keys = k_pool[:, tables[b]].reshape(heads, -1, head_dim)[:, :n]  # [H, n, D]
        values = v_pool[:, tables[b]].reshape(heads, -1, head_dim)[:, :n]
        ref = torch.softmax(q[:, b] @ keys.transpose(-1, -2), dim=-1) @ values  # [H, G, D]
        torch.testing.assert_close(out[:, b], ref, rtol=1e-5, atol=1e-5)


def test_fused_fp32_attention_refuses_bad_blocks_and_lengths() -> None:
    kernels = need_kernels(16, 4)
    k_pool = torch.zeros(1, 3, 4, 16)
    q = torch.zeros(1, 1, 1, 16)
    with pytest.raises(fp8_kernels.KernelError):
        kernels.decode_attention(k_pool, k_pool, None, None, torch.tensor([[3]]), torch.tensor([2]), q, torch.float32,
                                 torch.empty_like(q))
    for bad_len in (0, 5):  # nothing to attend to; more tokens than the listed block holds
        with pytest.raises(fp8_kernels.KernelError):
            kernels.decode_attention(k_pool, k_pool, None, None, torch.tensor([[1]]), torch.tensor([bad_len]), q,
                                     torch.float32, torch.empty_like(q))
    with pytest.raises(ValueError):  # lengths must be int64
        kernels.decode_attention(k_pool, k_pool, None, None, torch.tensor([[1]]), torch.tensor([2], dtype=torch.int32),
                                 q, torch.float32, torch.empty_like(q))


@pytest.mark.parametrize("sharpness", [1.0, 30.0, 300.0], ids=["soft", "sharp", "one-hot"])
def test_fused_fp32_attention_softmax_holds_for_wide_score_ranges(sharpness: float) -> None:
    """The kernel's own exp: scores spread over hundreds (most weights underflow next to the largest)."""
    kernels = need_kernels(64, 16)
    gen = torch.Generator().manual_seed(4)
    k_pool, v_pool = (torch.randn(2, 12, 16, 64, generator=gen) for _ in range(2))
    tables = torch.arange(12).view(2, 6)
    lens = torch.tensor([96, 77])
    q = torch.randn(2, 2, 4, 64, generator=gen) * sharpness / 8
    out = kernels.decode_attention(k_pool, v_pool, None, None, tables, lens, q, torch.float32, torch.empty_like(q))
    for b in range(2):
        n = int(lens[b])
        keys, values = (pool[:, tables[b]].reshape(2, -1, 64)[:, :n] for pool in (k_pool, v_pool))
        ref = torch.softmax(q[:, b].double() @ keys.double().transpose(-1, -2), dim=-1) @ values.double()
        torch.testing.assert_close(out[:, b].double(), ref, rtol=1e-5, atol=1e-5)
