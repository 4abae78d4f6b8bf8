"""The centred fp8 KV scheme's pure functions (gpu_workers/model/kv_quant.py): round-trip error bounds
that follow from the format (e4m3: 3 mantissa bits, a relative step of at most 2^-3, so rounding to
nearest errs by at most half a step of the scaled value), shapes, edge cases and capacity arithmetic."""

from __future__ import annotations

import pytest
import torch

from gpu_workers.model import kv_quant
from gpu_workers.model.fp8 import FP8_MAX

E4M3 = torch.float8_e4m3fn
# e4m3 normals: a relative error of at most 2^-4 after round to nearest; the subnormal range (below
# 2^-6 of the scale unit) has an absolute step of 2^-9 units: half of it bounds the error there
REL = 2.0**-4
SUBNORMAL_HALF_STEP = 2.0**-10


def keys_like_a_model(*lead: int, tokens: int = 16, dim: int = 64, seed: int = 0) -> torch.Tensor:
    """Keys with per-channel offsets far larger than their spread (outlier channels), as trained models' are."""
    g = torch.Generator().manual_seed(seed)
    offset = torch.randn(dim, generator=g) * 20
    spread = torch.rand(dim, generator=g) * 2 + 0.05
    return offset + spread * torch.randn(*lead, tokens, dim, generator=g)


def within_bound(k: torch.Tensor, q: kv_quant.QuantizedKeys, rel: float = REL,
                 subnormal_half_step: float = SUBNORMAL_HALF_STEP) -> bool:
    """Whether each key read back errs by at most ``rel`` of its residual (key minus the stored
    centre), or half a subnormal step in its channel's scale units."""
    centre = kv_quant.dequantize_keys(kv_quant.QuantizedKeys(torch.zeros_like(q.codes), q.centre_codes,
                                                             q.centre_scale, q.scale, q.dtype))
    scale = q.scale.float()[..., None, :]
    residual = k - centre
    bound = torch.maximum(residual.abs() * rel, scale * subnormal_half_step) * (1 + 1e-6)
    return bool(((kv_quant.dequantize_keys(q) - k).abs() <= bound).all())


def test_keys_round_trip_within_the_per_channel_bound() -> None:
    k = keys_like_a_model(3, 2)
    q = kv_quant.quantize_keys(k)
    assert q.codes.shape == (3, 2, 16, 64) and q.codes.dtype == torch.uint8
    assert q.centre_codes.shape == (3, 2, 64) and q.centre_scale.shape == (3, 2) and q.scale.shape == (3, 2, 64)
    assert q.scale.dtype == torch.bfloat16
    assert within_bound(k, q)


def test_centring_beats_plain_per_block_scales_on_offset_channels() -> None:
    k = keys_like_a_model(4, tokens=16)
    centred = (kv_quant.dequantize_keys(kv_quant.quantize_keys(k)) - k).norm()
    per_block_scale = k.abs().amax(dim=(-1, -2), keepdim=True) / FP8_MAX[E4M3]
    plain = ((k / per_block_scale).to(E4M3).float() * per_block_scale - k).norm()
    assert centred < plain / 4


def test_no_residual_saturates_with_bf16_scales() -> None:
    # amax / 448 rounded down to bf16 would push the largest residual past 448: scales round up
    amax = torch.tensor([1.0, 3.0, 448.0 * 1.0039, 7.77e-3, 1e6])
    s = kv_quant.stored_scale(amax)
    assert s.dtype == torch.bfloat16
    assert (amax / s.float() <= FP8_MAX[E4M3]).all()
    assert (amax / s.float() > FP8_MAX[E4M3] * (1 - 2**-7)).all()  # and no coarser than bf16 needs


def test_values_round_trip_per_token() -> None:
    g = torch.Generator().manual_seed(1)
    v = torch.randn(2, 16, 64, generator=g) * torch.logspace(-3, 2, 16)[:, None]  # tokens of very different size
    q = kv_quant.quantize_values(v)
    assert q.codes.shape == v.shape and q.scale.shape == (2, 16)
    back = kv_quant.dequantize_values(q)
    bound = torch.maximum(v.abs() * REL, q.scale.float()[..., None] * SUBNORMAL_HALF_STEP) * (1 + 1e-6)
    assert ((back - v).abs() <= bound).all()
    # each token's error is relative to its own size: the smallest tokens keep their relative precision
    rel = (back - v).norm(dim=-1) / v.norm(dim=-1)
    assert rel.max() < 0.05


@pytest.mark.parametrize("tokens", [1, 5, 16])
def test_partial_and_constant_blocks(tokens: int) -> None:
    k = keys_like_a_model(2, tokens=tokens)
    q = kv_quant.quantize_keys(k)
    assert kv_quant.dequantize_keys(q).shape == k.shape
    assert within_bound(k, q)
    constant = torch.full((3, 8), 2.5)  # every channel's residual is 0 (the centre is exact in e4m3)
    assert torch.equal(kv_quant.dequantize_keys(kv_quant.quantize_keys(constant)), constant)
    zeros = torch.zeros(4, 8)
    assert torch.equal(kv_quant.dequantize_keys(kv_quant.quantize_keys(zeros)), zeros)
    assert torch.equal(kv_quant.dequantize_values(kv_quant.quantize_values(zeros)), zeros)


def test_empty_block_is_refused() -> None:
    with pytest.raises(ValueError, match="no tokens"):
        kv_quant.quantize_keys(torch.zeros(0, 8))


def test_e5m2_codes_are_allowed() -> None:
    k = keys_like_a_model(tokens=16)
    q = kv_quant.quantize_keys(k, torch.float8_e5m2)
    assert q.dtype == torch.float8_e5m2
    assert within_bound(k, q, rel=2.0**-3, subnormal_half_step=2.0**-17)  # 2 mantissa bits; subnormals below 2^-14


def test_fake_quantize_equals_block_by_block() -> None:
    k = keys_like_a_model(2, tokens=37, seed=3)  # two whole blocks and a partial one
    got = kv_quant.fake_quantize(k, kv_quant.quantize_keys, kv_quant.dequantize_keys, 16)
    for start in (0, 16, 32):
        block = k[..., start : start + 16, :]
        assert torch.equal(got[..., start : start + 16, :], kv_quant.dequantize_keys(kv_quant.quantize_keys(block)))


def test_bytes_and_capacity_arithmetic() -> None:
    # head_dim 64 (SmolLM2): codes 2 x 16 x 64, centres 64 + 4, K scales 64 x 2, V scales 16 x 2
    assert kv_quant.bytes_per_block(16, 64) == 2048 + 68 + 128 + 32
    fp32_block = 2 * 16 * 64 * 4
    assert kv_quant.capacity_vs(16, 64, 1 << 30, dense_blocks=0) == pytest.approx(fp32_block / 2276)
    # a 1024-token sequence: 62 fp8 blocks and 2 bf16 ones
    assert kv_quant.capacity_vs(16, 64, 1024) == pytest.approx(64 * fp32_block / (62 * 2276 + 2 * fp32_block / 2))
    assert kv_quant.capacity_vs(16, 64, 1024) >= 3.5
    assert kv_quant.capacity_vs(16, 256, 1024) >= 3.5  # Gemma 3 270M's head_dim
    assert kv_quant.capacity_vs(16, 64, 16) == pytest.approx(2.0)  # a single block, in bf16
