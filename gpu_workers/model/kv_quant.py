"""The centred fp8 KV scheme: pure functions that quantize one cache block of K or V and read it back.

The numerics of the default ``fp8_e4m3`` cache (gpu_workers/model/kv_staged.py), applied when a
block completes, measured on real models by benchmarks/kv_schemes.py (simulated) and
benchmarks/kv_cache.py --model (the engine's cache; results: benchmarks/results/kv-quant-*.md).

Keys (one KV head's block, [..., T, D] with T <= block size):
    centre[d]   = (min_t k[t, d] + max_t k[t, d]) / 2, stored as fp8 under one fp32 scale per block;
    residual    = k - centre (the stored centre), one scale per channel d (amax / fp8 max, kept as
                  bf16 rounded up so that no residual saturates), codes fp8.
    Trained models' keys carry large per-channel offsets (outlier channels) that vary slowly along
    the sequence; removing the per-channel centre leaves residuals a fraction of the keys' range,
    and a per-channel scale fits each channel's own spread. KIVI (Liu et al. 2024, "KIVI: A
    Tuning-Free Asymmetric 2bit Quantization for KV Cache": per-channel keys with a zero point,
    per-token values) and KVQuant (Hooper et al. 2024: per-channel keys) with fp8 codes in place of
    integers.
Values: one scale per token (amax / fp8 max, bf16 rounded up), codes fp8 (KIVI's per-token values).

The scheme's accuracy holds with two blocks of each sequence read in bf16 (benchmarks/kv_schemes.py
"+ own + sink"): the newest, incomplete block (staged in bf16 until it completes, then quantized here
with its whole statistics) and the first block (the attention sink, Xiao et al. 2023, "Efficient
Streaming Language Models with Attention Sinks"), kept in bf16 for good.

Codes are raw uint8 (gpu_workers/model/fp8.py: CPU index kernels lack fp8 dtypes), fp8 e4m3 unless a
``dtype`` is given. Rounding is to nearest even, saturating.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TypeVar

import torch

from gpu_workers.model.fp8 import FP8_MAX, MIN_SCALE, code_values, quantize

FP8 = torch.float8_e4m3fn
CENTRE_SCALE_BYTES = 4  # fp32, one per (block, head) of K
SCALE_BYTES = 2  # bf16: each per-channel K scale and per-token V scale


@dataclass(frozen=True, slots=True)
class QuantizedKeys:
    """One block of keys: ``codes`` uint8 [..., T, D]; ``centre_codes`` uint8 [..., D] under
    ``centre_scale`` fp32 [...]; ``scale`` bf16 [..., D] (per channel)."""

    codes: torch.Tensor
    centre_codes: torch.Tensor
    centre_scale: torch.Tensor
    scale: torch.Tensor
    dtype: torch.dtype = FP8


@dataclass(frozen=True, slots=True)
class QuantizedValues:
    """One block of values: ``codes`` uint8 [..., T, D]; ``scale`` bf16 [..., T] (per token)."""

    codes: torch.Tensor
    scale: torch.Tensor
    dtype: torch.dtype = FP8


def stored_scale(amax: torch.Tensor, dtype: torch.dtype = FP8) -> torch.Tensor:
    """bf16 scales >= ``amax`` / fp8 max (rounded up, at least bf16's smallest normal), elementwise:
    ``x / scale`` never exceeds the format's largest value for ``|x| <= amax``."""
    exact = (amax.float() / FP8_MAX[dtype]).clamp(min=torch.finfo(torch.bfloat16).tiny)
    rounded = exact.to(torch.bfloat16)
    up = torch.nextafter(rounded, torch.tensor(float("inf"), dtype=torch.bfloat16))
    return torch.where(rounded.float() < exact, up, rounded)


def quantize_keys(k: torch.Tensor, dtype: torch.dtype = FP8) -> QuantizedKeys:
    """The centred, per-channel-scaled fp8 form of keys ``k`` [..., T, D] (one block of one or more
    KV heads, T >= 1 tokens: all of the block's, it is quantized once, when it completes)."""
    if k.shape[-2] == 0:
        raise ValueError("quantize_keys: a block of no tokens")
    k = k.float()
    centre = (k.amin(dim=-2) + k.amax(dim=-2)) / 2  # [..., D]
    centre_scale = (centre.abs().amax(dim=-1) / FP8_MAX[dtype]).clamp(min=MIN_SCALE)  # [...]
    centre_codes = quantize(centre, centre_scale[..., None], dtype)
    stored_centre = code_values(centre_codes, dtype, torch.float32) * centre_scale[..., None]
    residual = k - stored_centre[..., None, :]
    scale = stored_scale(residual.abs().amax(dim=-2), dtype)  # [..., D]
    codes = quantize(residual, scale[..., None, :].float(), dtype)
    return QuantizedKeys(codes, centre_codes, centre_scale, scale, dtype)


def dequantize_keys(q: QuantizedKeys, out_dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Keys [..., T, D] in ``out_dtype`` read back from ``q`` (computed in fp32)."""
    centre = code_values(q.centre_codes, q.dtype, torch.float32) * q.centre_scale[..., None]
    residual = code_values(q.codes, q.dtype, torch.float32) * q.scale[..., None, :].float()
    return (residual + centre[..., None, :]).to(out_dtype)


def quantize_values(v: torch.Tensor, dtype: torch.dtype = FP8) -> QuantizedValues:
    """The per-token-scaled fp8 form of values ``v`` [..., T, D]."""
    v = v.float()
    scale = stored_scale(v.abs().amax(dim=-1), dtype)  # [..., T]
    return QuantizedValues(quantize(v, scale[..., None].float(), dtype), scale, dtype)


def dequantize_values(q: QuantizedValues, out_dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Values [..., T, D] in ``out_dtype`` read back from ``q`` (computed in fp32)."""
    return (code_values(q.codes, q.dtype, torch.float32) * q.scale[..., None].float()).to(out_dtype)


def bytes_per_block(block_size: int, head_dim: int) -> int:
    """Bytes of one block of one KV head, K and V, metadata included: codes (1 byte per element),
    K's fp8 centres (D) and centre scale, K's per-channel scales (D) and V's per-token ones."""
    codes = 2 * block_size * head_dim
    return codes + head_dim + CENTRE_SCALE_BYTES + head_dim * SCALE_BYTES + block_size * SCALE_BYTES


def capacity_vs(block_size: int, head_dim: int, tokens: int, itemsize: int = 4, dense_blocks: int = 2) -> float:
    """How many times more tokens than a cache of ``itemsize``-byte elements (fp32: 4) the scheme holds
    for sequences of ``tokens`` tokens: whole blocks, of which ``dense_blocks`` (the sink block and
    the newest, staged block) are kept in bf16 instead."""
    blocks = -(-tokens // block_size)
    dense = min(dense_blocks, blocks)
    total = (blocks - dense) * bytes_per_block(block_size, head_dim) + dense * 2 * block_size * head_dim * 2
    return blocks * 2 * block_size * head_dim * itemsize / total


Q = TypeVar("Q", QuantizedKeys, QuantizedValues)


def fake_quantize(x: torch.Tensor, quant: Callable[[torch.Tensor], Q], dequant: Callable[[Q], torch.Tensor],
                  block_size: int) -> torch.Tensor:
    """``x`` [..., T, D] (one sequence's K or V) quantized block by block (blocks of ``block_size``
    tokens from position 0, the last one partial) and read back, fp32: what a cache returns."""
    t = x.shape[-2]
    full = t // block_size * block_size
    head = x[..., :full, :].unflatten(-2, (-1, block_size))  # [..., nb, BS, D]
    parts = [dequant(quant(head)).flatten(-3, -2)] if full else []
    if full < t:
        parts.append(dequant(quant(x[..., full:, :])))
    return torch.cat(parts, dim=-2)
