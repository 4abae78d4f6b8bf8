"""Weight-only quantized linears from GGUF files (``--quantization gguf``): blocks kept quantized.

A GGUF block stores small integer codes and one or two block constants; every type split here
is ``w = code * scale + zero`` per 32 weights of a row (Q6_K: per 16):

* Q4_0: codes 0..15, ``scale = d``, ``zero = -8 d``; Q4_1: codes 0..15, ``scale = d``, ``zero = m``;
* Q4_K: 256-weight super-blocks of eight 32-weight sub-blocks, codes 0..15,
  ``scale = d * sc``, ``zero = -dmin * mn`` (6-bit ``sc``, ``mn`` per sub-block);
* Q5_0: codes -16..15, Q5_1: 0..31 (``zero = m``), Q8_0: -128..127, ``scale = d``;
* Q6_K: codes -32..31, ``scale = d * sc`` per 16 weights (int8 ``sc``).

``block_parts`` splits blocks into those three parts (the ``gguf`` package's
``dequantize_blocks`` up to the last multiply, so ``codes * scale + zero`` equals its output).

``Int4Weight`` keeps 4-bit codes two per byte with fp32 block constants (group size 32: one
group per GGUF block), multiplied by the C kernel of ``quant_kernels`` (``int4_matmul``) on fp32
activations: each weight is dequantized in registers exactly as ``block_parts`` rounds it, so the
products are the fp32 matmul of the dequantized weights up to the order of the sum (torch's
``aten._weight_int4pack_mm_for_cpu``, the fallback without a C compiler, rounds activations, block
constants and outputs to bf16); ``benchmarks/quant_parity.py`` measures greedy tokens and the
next-token distribution against fp32 weights. Steps of ``DENSE_FROM_ROWS`` tokens or more
(prefill) dequantize the weight to fp32 instead, exactly, and multiply as fp32 weights do.

``Int8Weight`` keeps the other types (and fused layers mixing them with 4-bit parts, embeddings,
LM heads) as int8 codes with fp32 block constants, multiplied by the C kernel of
``quant_kernels`` on fp32 activations, exact in the same way. torch has no usable kernel for it
here: ``aten._weight_int8pack_mm`` takes one scale per output row and is unvectorized on AVX2,
``torch._int_mm`` quantizes the activations and is slower still.

Crossovers against oneDNN's fp32 linear (``benchmarks/quant_matmul.py``, SmolLM2's layers, 2
threads): see ``DENSE_FROM_ROWS`` and ``INT8_DENSE_FROM_ROWS``.
"""

from __future__ import annotations

import functools
from typing import Any

import numpy as np
import torch

from gpu_workers.model import huge_pages
from gpu_workers.model.cpu_matmul import linear

GROUP_SIZE = 32  # weights per block constant: a GGUF block (Q4_K: a sub-block)
PARTS = ("codes", "scale", "zero")
METHODS = ("gguf",)  # --quantization values (vLLM's name for serving a GGUF file's quantized weights)
# Rows (tokens in a step) from which Int4Weight dequantizes to fp32 instead of using the C int4 kernel
# (benchmarks/quant_matmul.py, SmolLM2's linear layers, 2 threads, load 4.5-4.9, quant_matmul-20261201-053146:
# the kernel takes 0.23x oneDNN's fp32 time at 1 row, 0.49x at 4, 0.79x at 8, 1.03x at 16, 1.20x at 32;
# dequantizing for the call 1.19x at 16, 1.09x at 32), and the same for torch's int4 kernel, its
# fallback (one [3072, 576] weight at load ~10: it wins at 1-8 rows, the two break even at ~64).
DENSE_FROM_ROWS = 32
TORCH_INT4_DENSE_FROM_ROWS = 64
# The same for Int8Weight's C kernel (benchmarks/quant_matmul.py on SmolLM2's layers, 2 threads:
# ~0.7x the fp32 time at 1-8 rows, ~0.9x at 16, ~1.4x at 32).
INT8_DENSE_FROM_ROWS = 32


def int4_types() -> frozenset[Any]:
    """The GGUF quantization types of 4-bit codes (``gguf.GGMLQuantizationType`` members): kept by
    ``Int4Weight``."""
    import gguf

    t = gguf.GGMLQuantizationType
    return frozenset({t.Q4_0, t.Q4_1, t.Q4_K})


def int8_types() -> frozenset[Any]:
    """Every type ``block_parts`` splits, whose codes fit in int8: kept by ``Int8Weight``."""
    import gguf

    t = gguf.GGMLQuantizationType
    return int4_types() | frozenset({t.Q5_0, t.Q5_1, t.Q6_K, t.Q8_0})


# Types whose block constants are a scale d (and Q5_1's zero m) in their first bytes: name -> (offset
# of d, offset of m or None); and Q6_K (d last, 16 int8 sub-block scales before it).
_SCALED = {"Q5_0": (0, None), "Q5_1": (0, 2), "Q8_0": (0, None), "Q6_K": (-2, None)}


def _scaled_parts(data: np.ndarray, kind: Any) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Codes, scale and zero per weight [blocks, weights per block] of Q5_0, Q5_1, Q8_0 or Q6_K
    blocks ``data`` [blocks, bytes]. The codes are the ``gguf`` package's own unpacking: its
    ``dequantize`` of the blocks with the scale set to 1 and the zero to 0; the scale and zero are
    what it multiplies and adds (Q6_K: ``d * sc``, constant over 16 weights)."""
    import gguf

    t = gguf.GGMLQuantizationType
    block, _ = gguf.GGML_QUANT_SIZES[kind]
    n = data.shape[0]

    def f16(b: np.ndarray) -> np.ndarray:
        return np.ascontiguousarray(b).view(np.float16).astype(np.float32)  # [n, 1]

    unit = data.copy()
    if kind == t.Q6_K:
        scales_at = block // 2 + block // 4  # after ql, qh: 16 int8 sub-block scales, then d
        d = f16(data[:, -2:])
        sub = d * data[:, scales_at:scales_at + 16].view(np.int8).astype(np.float32)  # [n, 16], as gguf rounds
        unit[:, scales_at:scales_at + 16] = 1
        unit[:, -2:] = np.array([1.0], dtype=np.float16).view(np.uint8)
        scale = np.repeat(sub, 16, axis=1)
        zero = np.zeros_like(scale)
    else:
        at, zero_at = _SCALED[kind.name]
        unit[:, at:at + 2] = np.array([1.0], dtype=np.float16).view(np.uint8)
        scale = np.broadcast_to(f16(data[:, at:at + 2]), (n, block))
        if zero_at is None:
            zero = np.zeros((n, block), dtype=np.float32)
        else:
            unit[:, zero_at:zero_at + 2] = 0
            zero = np.broadcast_to(f16(data[:, zero_at:zero_at + 2]), (n, block))
    return gguf.quants.dequantize(unit, kind).reshape(n, block), scale, zero


def _nibbles(qs: np.ndarray, n_blocks: int, width: int) -> np.ndarray:
    """4-bit codes [n_blocks, -1] of packed bytes: per ``width`` codes, low nibbles first."""
    shifted = qs.reshape((n_blocks, -1, 1, width // 2)) >> np.array([0, 4], dtype=np.uint8).reshape((1, 1, 2, 1))
    return (shifted & np.uint8(0x0F)).reshape((n_blocks, -1)).astype(np.float32)


def block_parts(blocks: np.ndarray, kind: Any) -> dict[str, np.ndarray]:
    """``codes``, ``scale`` and ``zero`` of each weight, fp32 arrays [rows, weights per row], of
    GGUF blocks ``blocks`` [rows, bytes per row] of type ``kind`` (one of ``int4_types``).

    ``codes * scale + zero`` equals ``gguf.quants.dequantize(blocks, kind)`` exactly; ``scale`` and
    ``zero`` are constant over each 32 weights. ValueError for another type.
    """
    import gguf

    t = gguf.GGMLQuantizationType
    block, size = gguf.GGML_QUANT_SIZES[kind]
    rows = blocks.shape[0]
    data = np.ascontiguousarray(blocks).reshape(-1, size)  # [blocks, bytes per block]
    n = data.shape[0]

    def f16(b: np.ndarray) -> np.ndarray:
        return np.ascontiguousarray(b).view(np.float16).astype(np.float32)  # [n, 1]

    if kind in (t.Q4_0, t.Q4_1):
        d = f16(data[:, :2])
        codes = _nibbles(data[:, 4 if kind == t.Q4_1 else 2:], n, block)
        zero = f16(data[:, 2:4]) if kind == t.Q4_1 else d * np.float32(-8)
        scale = np.broadcast_to(d, codes.shape)
        zero = np.broadcast_to(zero, codes.shape)
    elif kind == t.Q4_K:
        d, dmin = f16(data[:, :2]), f16(data[:, 2:4])
        sc, mn = gguf.quants.Q4_K.get_scale_min(data[:, 4:4 + gguf.quants.Q4_K.K_SCALE_SIZE])
        codes = _nibbles(data[:, 4 + gguf.quants.Q4_K.K_SCALE_SIZE:], n, 64)
        sub = (d * sc.astype(np.float32)).reshape(n, -1, 1)  # [n, 8, 1]: per 32-weight sub-block
        scale = np.broadcast_to(sub, (n, 8, GROUP_SIZE)).reshape(n, block)
        zero = np.broadcast_to(-(dmin * mn.astype(np.float32)).reshape(n, -1, 1), (n, 8, GROUP_SIZE)).reshape(n, block)
    elif kind.name in _SCALED:
        codes, scale, zero = _scaled_parts(data, kind)
        codes = codes.reshape(n, block)
    else:
        raise ValueError(f"quantization {kind.name} has no split into codes and block constants "
                         "(Q4_0, Q4_1, Q4_K, Q5_0, Q5_1, Q6_K, Q8_0 have)")
    return {"codes": codes.reshape(rows, -1), "scale": np.ascontiguousarray(scale).reshape(rows, -1),
            "zero": np.ascontiguousarray(zero).reshape(rows, -1)}


class Int4Weight:
    """A [out, in] weight as 4-bit codes with an fp32 scale and zero per 32 inputs (CPU only).

    Up to ``dense_from - 1`` rows (decode), the C kernel of ``quant_kernels`` (``int4_matmul``)
    multiplies fp32 activations by the weights dequantized in registers: the GGUF file's dequantized
    values exactly, so the products are the fp32 matmul's of the dequantized weight up to the order
    of the sum. From ``dense_from`` rows on (prefill, large batches), where oneDNN's fp32 matmul is
    faster, the weight is dequantized to fp32 for the call. Holds 0.75 bytes per weight against
    fp32's 4: the codes two per byte, and the fp32 scale and zero of each 32.

    Where the C kernels cannot be built (``quant_kernels.load`` is None), torch's
    ``aten._weight_int4pack_mm_for_cpu`` multiplies instead (``_TorchInt4``), with bf16
    activations, block constants and outputs, below ``TORCH_INT4_DENSE_FROM_ROWS`` rows; it needs
    ``out`` a multiple of ``torch_int4_row_block()`` (32, or 64 with AVX-512).
    """

    # False: new weights take torch's kernel even where the C one builds (benchmarks' A/B only)
    c_kernel = True

    def __init__(self, codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor) -> None:
        """``codes`` [out, in] integers 0..15 (any dtype), ``scale`` and ``zero`` [out, in] with one
        value per 32 inputs (``block_parts``' layout, e.g. after a tensor-parallel narrow).
        ValueError when ``in`` is not a multiple of 32 (or, for torch's kernel, ``out`` not one of
        ``torch_int4_row_block()``), a code is
        outside 0..15, or the constants vary within a group (a shard that cuts through GGUF blocks)."""
        from gpu_workers.model import quant_kernels

        out_features, in_features = codes.shape
        if in_features % GROUP_SIZE:
            raise ValueError(f"{in_features} inputs: not a multiple of the {GROUP_SIZE}-weight quantization blocks")
        groups = in_features // GROUP_SIZE
        scale_g = scale.reshape(out_features, groups, GROUP_SIZE)
        zero_g = zero.reshape(out_features, groups, GROUP_SIZE)
        if not (torch.equal(scale_g, scale_g[..., :1].expand_as(scale_g))
                and torch.equal(zero_g, zero_g[..., :1].expand_as(zero_g))):
            raise ValueError(f"the weight's columns do not start on a {GROUP_SIZE}-weight quantization block")
        self.out_features, self.in_features = out_features, in_features
        self.scale = scale_g[..., 0].to(torch.float32).contiguous()  # [out, groups]
        self.zero = zero_g[..., 0].to(torch.float32).contiguous()  # [out, groups]
        self._kernels = quant_kernels.load() if self.c_kernel else None
        self._torch: _TorchInt4 | None = None
        if self._kernels is not None:
            self.packed = huge_pages.copy_of(quant_kernels.pack_int4(codes))  # [out, in / 2] uint8, 2 MiB pages
            self.dense_from = DENSE_FROM_ROWS
        else:
            self._torch = _TorchInt4(codes, self.scale, self.zero)
            self.packed = self._torch.packed
            self.dense_from = TORCH_INT4_DENSE_FROM_ROWS

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        """``x`` [..., in] (fp32 or bf16) times the weight: [..., out] in ``x``'s dtype."""
        rows = x.reshape(-1, self.in_features)
        if rows.shape[0] >= self.dense_from:
            y = linear(rows, self.dequantize().to(x.dtype))
        else:
            y = self.multiply(rows).to(x.dtype)
        return y.reshape(*x.shape[:-1], self.out_features)

    def multiply(self, x: torch.Tensor) -> torch.Tensor:
        """``x`` [M, in] times the weight by the int4 kernel alone, at any row count: [M, out], fp32
        from the C kernel (bf16 from torch's, the fallback)."""
        if self._kernels is not None:
            return self._kernels.int4_matmul(x, self.packed, self.scale, self.zero)
        assert self._torch is not None
        return self._torch.matmul(x)

    def dequantize(self) -> torch.Tensor:
        """The fp32 weight [out, in]: ``code * scale + zero``, rounded as the ``gguf`` package rounds
        (no fused multiply-add), so the GGUF file's dequantized values exactly."""
        if self._kernels is not None:
            return self._kernels.int4_dequantize(self.packed, self.scale, self.zero)
        codes = self.codes().reshape(self.out_features, -1, GROUP_SIZE).float()  # [out, groups, 32]
        return (codes * self.scale[..., None] + self.zero[..., None]).reshape(self.out_features, self.in_features)

    def codes(self) -> torch.Tensor:
        """The codes [out, in] (uint8), read back from the packed layout."""
        from gpu_workers.model import quant_kernels

        return quant_kernels.unpack_int4(self.packed) if self._torch is None else self._torch.codes()

    def nbytes(self) -> int:
        """Bytes held: the packed codes and the block constants (and torch's bf16 copy of them)."""
        held = [self.packed, self.scale, self.zero] + ([self._torch.scales_zeros] if self._torch else [])
        return sum(t.numel() * t.element_size() for t in held)


@functools.cache
def torch_int4_row_block() -> int:
    """Rows that torch's ``_convert_weight_to_int4pack_for_cpu`` packs together on this CPU (64
    where torch runs AVX-512 code, else 32), found by packing a probe; ``out`` must be a multiple."""
    probe = torch.arange(64 * 32, dtype=torch.int32).reshape(64, 32) % 15
    packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(probe, 1)
    for block in (64, 32):
        if torch.equal(_torch_int4_codes(packed, block, 64, 32), probe.to(torch.uint8)):
            return block
    raise RuntimeError("this torch packs int4 weights in another layout than _TorchInt4 reads")


def _torch_int4_codes(packed: torch.Tensor, block: int, out_features: int, in_features: int) -> torch.Tensor:
    """The codes [out, in] (uint8) of torch's int4 CPU layout: per block of ``block`` rows and per
    input, ``block / 2`` bytes whose low nibbles are the block's first half of rows, high the second."""
    blocks = packed.view(torch.uint8).reshape(out_features // block, in_features, block // 2)
    codes = torch.cat([blocks & 0x0F, blocks >> 4], dim=2)  # [out / block, in, block]
    return codes.transpose(1, 2).reshape(out_features, in_features)


class _TorchInt4:
    """4-bit codes in the layout of torch's ``aten._weight_int4pack_mm_for_cpu`` (group 32): the
    fallback of ``Int4Weight`` without a C compiler. The kernel takes bf16 activations and block
    constants and returns bf16: the product differs from the fp32 matmul of the dequantized weight
    by those roundings (``benchmarks/quant_parity.py``)."""

    def __init__(self, codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor) -> None:
        """``codes`` [out, in] 0..15, ``scale`` and ``zero`` fp32 [out, in / 32]. ValueError when
        ``out`` is not a multiple of ``torch_int4_row_block()`` or a code is outside 0..15;
        RuntimeError when this torch packs in a layout not read here."""
        out_features, in_features = codes.shape
        self.block = torch_int4_row_block()
        if out_features % self.block:
            raise ValueError(f"{out_features} outputs: not a multiple of {self.block} (torch's int4 row blocks)")
        if codes.numel() and (codes.min() < 0 or codes.max() > 15):  # torch packs them without an error
            raise ValueError("4-bit codes outside 0..15")
        self.out_features, self.in_features = out_features, in_features
        self.packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(codes.to(torch.int32).contiguous(), 1)
        if not torch.equal(self.codes(), codes.to(torch.uint8)):
            raise RuntimeError("this torch packs int4 weights in another layout than _TorchInt4.codes reads")
        # the kernel computes (code - 8) * scale + zero'
        self.scales_zeros = torch.stack([scale.t(), (zero + 8 * scale).t()], dim=-1).to(torch.bfloat16).contiguous()

    def matmul(self, rows: torch.Tensor) -> torch.Tensor:
        """``rows`` [M, in] times the weight: [M, out] bf16."""
        return torch.ops.aten._weight_int4pack_mm_for_cpu(rows.to(torch.bfloat16), self.packed, GROUP_SIZE,
                                                          self.scales_zeros)

    def codes(self) -> torch.Tensor:
        """The codes [out, in] (uint8) read back from torch's layout."""
        return _torch_int4_codes(self.packed, self.block, self.out_features, self.in_features)


class Int8Weight:
    """A [out, in] weight as int8 codes with an fp32 scale (and zero) per 16 or 32 inputs (CPU only):
    GGUF's 5-, 6- and 8-bit types, and layers that fuse 4-bit parts with those.

    Up to ``dense_from - 1`` rows, the C kernel of ``quant_kernels`` multiplies fp32 activations by
    the weights dequantized in registers (the dequantized values exactly; only the order of the
    sum differs from the fp32 matmul); from ``dense_from`` rows on, where that kernel is slower than
    oneDNN's fp32 one, the weight is dequantized to fp32 for the call. Holds 1 byte per weight plus
    4 per 32 (Q8_0, Q5_0) or per 16 (Q6_K) for the scales, and as much again for zeros where a part
    has them (Q4_1, Q4_K, Q5_1; Q4_0's too, which ``block_parts`` splits with a zero).
    """

    dense_from = INT8_DENSE_FROM_ROWS

    def __init__(self, codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor) -> None:
        """``codes`` [out, in] integers -128..127 (any dtype), ``scale`` and ``zero`` [out, in], each
        constant over 32 inputs (or 16: Q6_K's sub-blocks), as ``block_parts`` gives them. ValueError
        when ``in`` is not a multiple of 32 or the constants vary within 16 inputs (a shard that cuts
        through blocks); RuntimeError when the kernels cannot be built (``quant_kernels.load``)."""
        from gpu_workers.model import quant_kernels

        kernels = quant_kernels.load()
        if kernels is None:
            raise RuntimeError("the int8 weight kernels could not be built (see the log)")
        self._kernels = kernels
        out_features, in_features = codes.shape
        if in_features % GROUP_SIZE:
            raise ValueError(f"{in_features} inputs: not a multiple of the {GROUP_SIZE}-weight quantization blocks")
        for group in (GROUP_SIZE, GROUP_SIZE // 2):
            scale_g = scale.reshape(out_features, -1, group)
            zero_g = zero.reshape(out_features, -1, group)
            if (torch.equal(scale_g, scale_g[..., :1].expand_as(scale_g))
                    and torch.equal(zero_g, zero_g[..., :1].expand_as(zero_g))):
                break
        else:
            raise ValueError(f"the weight's columns do not start on a {GROUP_SIZE // 2}-weight quantization block")
        self.out_features, self.in_features, self.group = out_features, in_features, group
        self.codes = huge_pages.copy_of(codes.to(torch.int8))  # streamed every step: 2 MiB pages
        if not torch.equal(self.codes.to(codes.dtype), codes):
            raise ValueError("codes outside -128..127")
        self.scale = scale_g[..., 0].to(torch.float32).contiguous()  # [out, in / group]
        self.zero = zero_g[..., 0].to(torch.float32).contiguous() if bool(zero.any()) else None

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        """``x`` [..., in] (fp32 or bf16) times the weight: [..., out] in ``x``'s dtype."""
        if x.reshape(-1, self.in_features).shape[0] < self.dense_from:
            return self.multiply(x)

        return linear(x, self.dequantize().to(x.dtype))

    def multiply(self, x: torch.Tensor) -> torch.Tensor:
        """``x`` [..., in] times the weight by the kernel alone, at any row count: [..., out]."""
        y = self._kernels.matmul(x.reshape(-1, self.in_features), self.codes, self.scale, self.zero, self.group)
        return y.to(x.dtype).reshape(*x.shape[:-1], self.out_features)

    def dequantize(self) -> torch.Tensor:
        """The fp32 weight [out, in]: ``code * scale (+ zero)``, the GGUF file's dequantized values."""
        return self._kernels.dequantize(self.codes, self.scale, self.zero, self.group)

    def rows(self, ids: torch.Tensor) -> torch.Tensor:
        """Rows ``ids`` [...] (int64) of the fp32 weight: [..., in], as ``dequantize`` gives them."""
        codes = self.codes[ids].float().reshape(*ids.shape, -1, self.group)  # [..., groups, group]
        w = codes * self.scale[ids][..., None]
        if self.zero is not None:
            w = w + self.zero[ids][..., None]
        return w.reshape(*ids.shape, self.in_features)

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.codes, self.scale, self.zero) if t is not None)
