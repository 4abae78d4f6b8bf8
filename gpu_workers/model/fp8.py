"""fp8 numerics of the KV cache: power-of-two scales, quantization to codes, code values.

The cache keeps fp8 values as raw uint8 codes (CPU index kernels lack fp8 dtypes). A value ``x`` is
stored as the code of ``x / scale`` and read back as ``value(code) * scale``. Quantization clamps to
the format's largest finite value, so finite input never yields a NaN or inf code; inputs beyond
±2^127 are clamped first, so that no dequantized value can round past the fp32 range.
"""

from __future__ import annotations

import functools

import torch

FP8_MAX: dict[torch.dtype, float] = {
    torch.float8_e4m3fn: torch.finfo(torch.float8_e4m3fn).max,  # 448
    torch.float8_e5m2: torch.finfo(torch.float8_e5m2).max,  # 57344
}
SCALE_DTYPE = torch.float32
MIN_SCALE = torch.finfo(SCALE_DTYPE).tiny  # 2^-126: the scale of an all-zero block
MAX_INPUT = 2.0**127


def pow2_scale(amax: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The smallest power of two ``s >= amax / fp8 max`` (and >= MIN_SCALE), elementwise, fp32.

    Power-of-two scales make rescaling exact: multiplying codes by a ratio of two of them only
    shifts exponents (bits are lost only by values pushed below the smallest subnormal).
    """
    ratio = (amax.to(SCALE_DTYPE).clamp(max=MAX_INPUT) / FP8_MAX[dtype]).clamp_(min=MIN_SCALE)
    mantissa, exponent = torch.frexp(ratio)  # ratio = mantissa * 2^exponent, mantissa in [0.5, 1)
    exponent = exponent - (mantissa == 0.5).to(exponent.dtype)  # exact powers of two stay as they are
    return torch.ldexp(torch.ones_like(ratio), exponent)


def quantize(x: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """uint8 codes of ``x / scale`` in fp8 ``dtype`` (``scale`` broadcasts against ``x``), saturating."""
    fmax = FP8_MAX[dtype]
    q = x.to(SCALE_DTYPE).clamp(-MAX_INPUT, MAX_INPUT).div_(scale).clamp_(-fmax, fmax)
    return q.to(dtype).view(torch.uint8)


def quantize_per_vector(x: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """(uint8 codes, fp32 scales [...]) of ``x`` [..., D] with one exact scale (amax / fp8 max) per
    vector; an all-zero vector gets MIN_SCALE and stays zero."""
    amax = x.to(SCALE_DTYPE).clamp(-MAX_INPUT, MAX_INPUT).abs().amax(dim=-1)
    scale = (amax / FP8_MAX[dtype]).clamp_(min=MIN_SCALE)
    return quantize(x, scale[..., None], dtype), scale


def code_values(codes: torch.Tensor, dtype: torch.dtype, out_dtype: torch.dtype) -> torch.Tensor:
    """The values of uint8 ``codes`` of fp8 ``dtype`` (scales not applied), as ``out_dtype``.

    On CPUs torch's fp8 cast is a slow scalar loop; a lookup in a 256-entry table (one gather) is
    ~2x faster. Elsewhere the cast is the fast path.
    """
    if codes.device.type != "cpu":
        return codes.view(dtype).to(out_dtype)
    table = _value_table(dtype, out_dtype)
    return table.index_select(0, codes.reshape(-1).int()).view(codes.shape)


@functools.cache
def _value_table(dtype: torch.dtype, out_dtype: torch.dtype) -> torch.Tensor:
    # NaN codes are never written: their entries do not matter, 0 keeps the table finite
    return torch.nan_to_num(torch.arange(256, dtype=torch.uint8).view(dtype).to(out_dtype), nan=0.0)
