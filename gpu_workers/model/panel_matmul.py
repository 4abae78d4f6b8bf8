"""fp32 matmuls on weights packed in 16-feature panels (panel_matmul.c): the CPU linears' kernel.

``pack(weight)`` turns a linear's [out, in] weight into ``ceil(out / 16)`` panels of [in, 16], and
``matmul(x, packed, out_features)`` multiplies by it: each panel is read once, front to back, for any
number of rows, so a decode step streams the weights at the memory's speed, and larger batches run as
a register-tiled GEMM. On the 2-core AVX-512 VM, against oneDNN on its own packed layout, SmolLM2's 121
linears of a decode step took 14.2 against 18.5 ms at 1 row, 19.9 against 23.6 at 8, 90 against 94 at
64 and even at 256 (benchmarks/matmul.py ``--kernels``).

Every output is one thread's in-order sum over the input features, the same operations for any
number of rows and threads, so a row's result does not depend on the rows beside it (batch
invariance, bit for bit).

``load()`` builds the library on first use (``c_build.build_library``); None where no compiler works
(logged once: the CPU linears then use oneDNN) or with ``RYZ_CPU_MATMUL=onednn`` (A/B measurements).
"""

from __future__ import annotations

import ctypes
import functools
import logging
import os
import subprocess
from collections.abc import Callable, Sequence
from pathlib import Path

import torch

from gpu_workers.model import huge_pages
from gpu_workers.model.c_build import build_library

log = logging.getLogger(__name__)

SOURCE = Path(__file__).with_name("panel_matmul.c")
# -ffp-contract=fast: each step of a sum is one fused multiply-add, in every tile shape alike
FLAGS = ("-O3", "-march=native", "-fPIC", "-shared", "-pthread", "-ffp-contract=fast")
DEPENDS = (SOURCE.with_name("work_pool.h"), SOURCE.with_name("layer_ops.h"))  # its includes: the build key
PANEL = 16  # output features per panel (panel_matmul.c)
# Layers from this size are packed (below it F.linear's MKL call costs little more); products of fewer
# multiply-adds than SERIAL_MACS run on the calling thread alone, cheaper than waking another.
MIN_WEIGHTS = 1 << 14
SERIAL_MACS = 1 << 16

_P = ctypes.c_void_p
_I = ctypes.c_int64
_F = ctypes.c_float


class PanelKernels:
    """Typed entry points; ValueError for operands the C code would misread (it reads raw fp32 memory)."""

    def __init__(self, lib: ctypes.CDLL) -> None:
        lib.panel_matmul.argtypes = [_P, _I, _I, _I, _P, _I, _P, _P, _I, ctypes.c_int]
        lib.panel_pack.argtypes = [_P, _I, _I, _I, _P]
        lib.decoder_attention_in.argtypes = [_P, _P, _P, _F, ctypes.c_int, _I, _I, _P, _P, _P, _F, _I, _I, _P, _P, _I,
                                             _P, _P, _P, ctypes.c_int]
        lib.decoder_mlp.argtypes = [_P, _P, _P, _P, _F, ctypes.c_int, _P, _P, _I, _I, _P, _P, _P, _P, _P, _P,
                                    ctypes.c_int]
        lib.gemma_mlp_in.argtypes = [_P, _P, _P, _P, _P, _F, _P, _I, _I, _P, _P, _P, _P, _P, ctypes.c_int]
        lib.gemma_mlp_out.argtypes = [_P, _P, _P, _P, _F, _I, _I, _P, _P, _P, ctypes.c_int]
        for f in (lib.panel_matmul, lib.panel_pack, lib.decoder_attention_in, lib.decoder_mlp, lib.gemma_mlp_in,
                  lib.gemma_mlp_out):
            f.restype = None
        lib.decoder_layers.argtypes = [_P, _I, _P, _I, _I, _P, _P, _P, _P, _P, _P, _P, _P, _P, _P, _P, _P, _P,
                                       ctypes.c_int]
        lib.decoder_layers.restype = ctypes.c_int
        lib.panel_matmul_units.argtypes = [_P, _I, _I, _I, _P, _I, _P, _P, _I, _P, _I]
        lib.panel_matmul_units.restype = None
        lib.panel_unit_outputs.argtypes = []
        lib.panel_unit_outputs.restype = ctypes.c_int
        self.lib = lib  # (public: greedy_head types the screen's entry points on it)
        self.unit_outputs: int = lib.panel_unit_outputs()  # outputs per unit of matmul_units

    def pack(self, weight: torch.Tensor) -> torch.Tensor:
        """``weight`` [out, in] (fp32, CPU) as panels [ceil(out / 16), in, 16], zero-padded, in memory
        asked to be backed by 2 MiB pages (huge_pages.empty: every decode step streams them)."""
        _check_fp32(weight)
        if weight.dim() != 2 or weight.stride(1) != 1:
            weight = weight.reshape(weight.shape[0], -1).contiguous()
        n, k = weight.shape
        packed = huge_pages.empty(((n + PANEL - 1) // PANEL, k, PANEL))  # streamed every step: 2 MiB pages
        self.lib.panel_pack(weight.data_ptr(), n, k, weight.stride(0), packed.data_ptr())
        return packed

    def matmul(self, x: torch.Tensor, packed: torch.Tensor, out_features: int,
               bias: torch.Tensor | None = None) -> torch.Tensor:
        """``x`` [..., in] times the packed weight (``pack``) of ``out_features`` rows, plus ``bias``
        [out_features]: [..., out_features], as ``F.linear(x, weight, bias)``."""
        for t in (x, packed) if bias is None else (x, packed, bias):
            _check_fp32(t)
        k = packed.shape[1]
        if (x.shape[-1] != k or packed.dim() != 3 or packed.shape[2] != PANEL or not packed.is_contiguous()
                or packed.shape[0] != (out_features + PANEL - 1) // PANEL):
            raise ValueError(f"x {tuple(x.shape)} against panels {tuple(packed.shape)} of {out_features} outputs")
        _check_aligned(packed)
        if bias is not None:
            if bias.shape != (out_features,):
                raise ValueError(f"bias {tuple(bias.shape)} for {out_features} outputs")
            bias = bias.contiguous()
        rows = x.reshape(-1, k)
        if rows.stride(-1) != 1:
            rows = rows.contiguous()
        out = torch.empty(rows.shape[0], out_features)
        if out.numel():
            self.lib.panel_matmul(rows.data_ptr(), rows.shape[0], k, rows.stride(0), packed.data_ptr(), out_features,
                                   None if bias is None else bias.data_ptr(), out.data_ptr(), out_features,
                                   1 if out.numel() * k < SERIAL_MACS else torch.get_num_threads())
        return out.view(*x.shape[:-1], out_features)

    def matmul_units(self, x: torch.Tensor, packed: torch.Tensor, out_features: int, units: torch.Tensor,
                     out: torch.Tensor) -> None:
        """``matmul``'s outputs of the panel ``units`` listed (int64 [U]; unit u: outputs ``unit_outputs
        * u`` on) written into ``out`` [M, out_features] for ``x`` [M, in], the same bits ``matmul``
        gives them; ``out``'s other columns are left as they were. On the calling thread."""
        _check_fp32(x)
        k = packed.shape[1]
        if (x.dim() != 2 or x.shape[1] != k or not x.is_contiguous() or packed.dim() != 3
                or packed.shape[0] != (out_features + PANEL - 1) // PANEL or not packed.is_contiguous()
                or out.shape != (x.shape[0], out_features) or not out.is_contiguous() or out.dtype != torch.float32
                or units.dtype != torch.int64 or units.dim() != 1 or not units.is_contiguous()):
            raise ValueError(f"x {tuple(x.shape)}, panels {tuple(packed.shape)}, out {tuple(out.shape)}, "
                             f"units {tuple(units.shape)} {units.dtype}")
        _check_aligned(packed)
        self.lib.panel_matmul_units(x.data_ptr(), x.shape[0], k, k, packed.data_ptr(), out_features, None,
                                     units.data_ptr(), units.numel(), out.data_ptr(), out_features)

    def decoder_attention_in(self, x: torch.Tensor, residual: torch.Tensor | None, norm_w: torch.Tensor, eps: float,
                             offset: bool, qkv: Linear, cos: torch.Tensor, sin: torch.Tensor, heads: int, kv_heads: int,
                             head_dim: int, stream: torch.Tensor, normed: torch.Tensor,
                             qk_norms: tuple[torch.Tensor, torch.Tensor, float] | None = None) -> torch.Tensor:
        """A decoder layer's part before attention (panel_matmul.c ``decoder_attention_in``) for ``x``
        [T, H]: ``stream`` [T, H] <- x + residual (untouched when ``residual`` is None), ``normed``
        [T, H] <- RMSNorm of that, and returned: its QKV projection [T, qkv.n] through ``qkv`` (its
        bias added), the ``heads`` query and ``kv_heads`` key heads of ``head_dim`` RMS-normalized by
        ``qk_norms`` (q weight [head_dim], k weight [head_dim], eps; the layer norm's ``offset``)
        where given, and rotated by ``cos``, ``sin`` [T, head_dim / 2]. ValueError for operands the C
        code would misread."""
        t, hidden = x.shape
        q_norm, k_norm, qk_eps = qk_norms if qk_norms is not None else (None, None, 0.0)
        operands = [x, norm_w, cos, sin, stream, normed] + [o for o in (residual, q_norm, k_norm) if o is not None]
        _check_contiguous(operands)
        half = head_dim // 2
        if (norm_w.shape != (hidden,) or stream.shape != x.shape or normed.shape != x.shape
                or (residual is not None and residual.shape != x.shape) or cos.shape != (t, half)
                or sin.shape != (t, half) or (heads + kv_heads) * head_dim > qkv.n or head_dim % 2 or qkv.k != hidden
                or any(w is not None and w.shape != (head_dim,) for w in (q_norm, k_norm))):
            raise ValueError(f"decoder_attention_in: x {tuple(x.shape)}, a linear of {qkv.k} -> {qkv.n}, "
                             f"cos {tuple(cos.shape)}, {heads} + {kv_heads} heads of {head_dim}")
        out = torch.empty(t, qkv.n)
        self.lib.decoder_attention_in(x.data_ptr(), _ptr(residual), norm_w.data_ptr(), eps, int(offset), t, hidden,
                                       ctypes.byref(qkv), _ptr(q_norm), _ptr(k_norm), qk_eps, heads, kv_heads,
                                       cos.data_ptr(), sin.data_ptr(), head_dim, stream.data_ptr(), normed.data_ptr(),
                                       out.data_ptr(), torch.get_num_threads())
        return out

    def decoder_mlp(self, context: torch.Tensor, stream: torch.Tensor, o: Linear, post_w: torch.Tensor, eps: float,
                    offset: bool, gate_up: Linear, down: Linear, mlp_stream: torch.Tensor, out: torch.Tensor) -> None:
        """A decoder layer's half after attention (panel_matmul.c ``decoder_mlp``) for the attention
        output ``context`` [T, A] and the residual ``stream`` [T, H]: ``mlp_stream`` [T, H] <-
        o(context) + stream, ``out`` [T, H] <- the MLP (``gate_up`` of 2 I outputs, SiLU-and-multiply,
        ``down``) of its post-attention RMSNorm. The layer's output is out + mlp_stream. ValueError for
        operands the C code would misread."""
        t, attn_dim = context.shape
        hidden = stream.shape[1]
        _check_contiguous([context, stream, post_w, mlp_stream, out])
        inter = gate_up.n // 2
        if (stream.shape != (t, hidden) or mlp_stream.shape != stream.shape or out.shape != stream.shape
                or post_w.shape != (hidden,) or (o.k, o.n) != (attn_dim, hidden) or gate_up.n % 2
                or (gate_up.k, down.k, down.n) != (hidden, inter, hidden)):
            raise ValueError(f"decoder_mlp: context {tuple(context.shape)}, stream {tuple(stream.shape)}, linears "
                             f"{o.k} -> {o.n}, {gate_up.k} -> {gate_up.n}, {down.k} -> {down.n}")
        h, n2, gu, a = torch.empty(t, hidden), torch.empty(t, hidden), torch.empty(t, 2 * inter), torch.empty(t, inter)
        self.lib.decoder_mlp(context.data_ptr(), stream.data_ptr(), ctypes.byref(o), post_w.data_ptr(), eps,
                              int(offset), ctypes.byref(gate_up), ctypes.byref(down), t, hidden, h.data_ptr(),
                              mlp_stream.data_ptr(), n2.data_ptr(), gu.data_ptr(), a.data_ptr(), out.data_ptr(),
                              torch.get_num_threads())


    def gemma_mlp_in(self, context: torch.Tensor, stream: torch.Tensor, o: Linear, post_attn_w: torch.Tensor,
                     pre_ff_w: torch.Tensor, eps: float, gate_up: Linear, mlp_stream: torch.Tensor) -> torch.Tensor:
        """Gemma 3's layer after attention up to its activation (panel_matmul.c ``gemma_mlp_in``) for
        the attention output ``context`` [T, A] and the layer input ``stream`` [T, H]: ``mlp_stream``
        [T, H] <- RMSNorm(o(context)) + stream (post-attention norm), and returned: ``gate_up`` [T, 2 I]
        of the pre-feedforward norm of that. ValueError for operands the C code would misread."""
        t, attn_dim = context.shape
        hidden = stream.shape[1]
        _check_contiguous([context, stream, post_attn_w, pre_ff_w, mlp_stream])
        if (stream.shape != (t, hidden) or mlp_stream.shape != stream.shape or post_attn_w.shape != (hidden,)
                or pre_ff_w.shape != (hidden,) or (o.k, o.n) != (attn_dim, hidden) or gate_up.k != hidden):
            raise ValueError(f"gemma_mlp_in: context {tuple(context.shape)}, stream {tuple(stream.shape)}, linears "
                             f"{o.k} -> {o.n}, {gate_up.k} -> {gate_up.n}")
        o_out, p, n2, gu = torch.empty(t, hidden), torch.empty(t, hidden), torch.empty(t, hidden), torch.empty(t, gate_up.n)
        self.lib.gemma_mlp_in(context.data_ptr(), stream.data_ptr(), ctypes.byref(o), post_attn_w.data_ptr(),
                               pre_ff_w.data_ptr(), eps, ctypes.byref(gate_up), t, hidden, o_out.data_ptr(),
                               p.data_ptr(), mlp_stream.data_ptr(), n2.data_ptr(), gu.data_ptr(), torch.get_num_threads())
        return gu

    def gemma_mlp_out(self, act: torch.Tensor, mlp_stream: torch.Tensor, down: Linear, post_ff_w: torch.Tensor,
                      eps: float, out: torch.Tensor) -> None:
        """Gemma 3's layer after its activation (panel_matmul.c ``gemma_mlp_out``): ``out`` [T, H] <-
        ``mlp_stream`` + RMSNorm(down(act)) (post-feedforward norm), the layer's output. ``act``
        [T, I]. ValueError for operands the C code would misread."""
        t, inter = act.shape
        hidden = mlp_stream.shape[1]
        _check_contiguous([act, mlp_stream, post_ff_w, out])
        if (mlp_stream.shape != (t, hidden) or out.shape != mlp_stream.shape or post_ff_w.shape != (hidden,)
                or (down.k, down.n) != (inter, hidden)):
            raise ValueError(f"gemma_mlp_out: act {tuple(act.shape)}, stream {tuple(mlp_stream.shape)}, "
                             f"a linear of {down.k} -> {down.n}")
        dn, q = torch.empty(t, hidden), torch.empty(t, hidden)
        self.lib.gemma_mlp_out(act.data_ptr(), mlp_stream.data_ptr(), ctypes.byref(down), post_ff_w.data_ptr(), eps,
                                t, hidden, dn.data_ptr(), q.data_ptr(), out.data_ptr(), torch.get_num_threads())


    def decoder_layers(self, layers: DecoderLayers, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                       steps: Sequence[ctypes.Structure]) -> tuple[torch.Tensor, torch.Tensor]:
        """A decode-only step through ``layers`` (panel_matmul.c ``decoder_layers``: each layer's
        ``decoder_attention_in``, its cache's attend function, ``decoder_mlp``, with no return to Python
        between them) for the input embeddings ``x`` [T, H] and RoPE ``cos``, ``sin`` [T, d / 2];
        ``steps[g]``: KV cache group g's ``fp8_kernels.AttentionStep``. Returns the last layer's output
        as its two addends (out, mlp_stream) [T, H] each. ValueError for operands the C code would
        misread, KernelError (fp8_kernels) when an attention refuses its step."""
        t, hidden = x.shape
        half = layers.head_dim // 2
        _check_contiguous([x, cos, sin])
        if hidden != layers.hidden or cos.shape != (t, half) or sin.shape != (t, half) or len(steps) != layers.groups:
            raise ValueError(f"decoder_layers: x {tuple(x.shape)}, cos {tuple(cos.shape)}, {len(steps)} steps "
                             f"for layers of {layers.hidden} with {layers.groups} KV cache groups")
        stream, mlp_stream, out, normed, h, n2 = (torch.empty(t, hidden) for _ in range(6))
        qkv, context = torch.empty(t, layers.qkv_width), torch.empty(t, layers.attn_width)
        gu, a = torch.empty(t, 2 * layers.intermediate), torch.empty(t, layers.intermediate)
        step_ptrs = (ctypes.c_void_p * len(steps))(*(ctypes.addressof(s) for s in steps))
        rc = self.lib.decoder_layers(ctypes.addressof(layers.array), len(layers.array), x.data_ptr(), t, hidden,
                                      cos.data_ptr(), sin.data_ptr(), step_ptrs, stream.data_ptr(),
                                      mlp_stream.data_ptr(), out.data_ptr(), normed.data_ptr(), qkv.data_ptr(),
                                      context.data_ptr(), h.data_ptr(), n2.data_ptr(), gu.data_ptr(), a.data_ptr(),
                                      torch.get_num_threads())
        _check_attend(rc, "decoder_layers")
        return out, mlp_stream


class Linear(ctypes.Structure):
    """A linear layer's weight as the decoder halves take it (panel_matmul.c ``struct linear``), made by
    ``panels_linear`` or ``kernel_linear``, which check its operands; it holds their tensors, so the
    addresses it carries stay valid while it lives."""

    _fields_ = [("w", _P), ("scale", _P), ("zero", _P), ("bias", _P), ("fn", _P), ("k", _I), ("n", _I), ("group", _I)]
    _tensors: tuple[torch.Tensor | None, ...]


_ATTEND = ctypes.CFUNCTYPE(ctypes.c_int, _P, _P, _P, _P, ctypes.c_int)


class DecoderLayer(ctypes.Structure):
    """One Llama-family layer as ``decoder_layers`` runs it (panel_matmul.c ``struct decoder_layer``)."""

    _fields_ = [("norm_w", _P), ("post_w", _P), ("q_norm_w", _P), ("k_norm_w", _P), ("eps", _F), ("post_eps", _F),
                ("qk_eps", _F), ("offset", ctypes.c_int), ("heads", _I), ("kv_heads", _I), ("d", _I), ("group", _I),
                ("qkv", ctypes.POINTER(Linear)), ("o", ctypes.POINTER(Linear)), ("gate_up", ctypes.POINTER(Linear)),
                ("down", ctypes.POINTER(Linear)), ("attend", _P), ("attention", _P)]


class DecoderLayers:
    """The layers of a model for ``decoder_layers``, all of one shape (hidden size, heads, head size,
    intermediate size); it holds every object whose address the structs carry."""

    def __init__(self, layers: list[DecoderLayer], keep: Sequence[object], *, hidden: int, heads: int, kv_heads: int,
                 head_dim: int, intermediate: int, groups: int) -> None:
        self.array = (DecoderLayer * len(layers))(*layers)
        self._keep = keep
        self.hidden, self.head_dim, self.intermediate, self.groups = hidden, head_dim, intermediate, groups
        self.qkv_width, self.attn_width = (heads + 2 * kv_heads) * head_dim, heads * head_dim


def attend(address: int, layer: ctypes.Structure, step: ctypes.Structure, qkv: torch.Tensor,
           context: torch.Tensor) -> None:
    """One layer's attention through its cache's ``attend_fn`` at ``address`` (panel_matmul.c): the step's
    K and V from ``qkv`` [T, (H + 2 Hkv) D] stored, ``context`` [T, H D] written. The caller vouches for
    the shapes; KernelError where the function refuses its step."""
    rc = _attend_fn(address)(ctypes.addressof(layer), ctypes.addressof(step), qkv.data_ptr(), context.data_ptr(),
                          torch.get_num_threads())
    _check_attend(rc, "attention")


def _check_attend(rc: int, what: str) -> None:
    """An ``attend_fn``'s code (or ``decoder_layers``', which passes it on) as the exception it stands for."""
    from gpu_workers.model.fp8_kernels import KernelError

    if rc == -2:
        raise MemoryError(f"{what}: no scratch memory")
    if rc != 0:
        raise KernelError("a decode step names a slot, block or length outside the KV cache")


@functools.cache
def _attend_fn(address: int) -> Callable[..., int]:
    return _ATTEND(address)


def panels_linear(packed: torch.Tensor, in_features: int, out_features: int, bias: torch.Tensor | None) -> Linear:
    """The linear of ``pack``'s panels of a [out_features, in_features] weight, plus ``bias``
    [out_features]. ValueError for panels of another shape, misaligned, or other dtypes."""
    _check_contiguous([packed] + ([] if bias is None else [bias]))
    if not _panels_of(packed, in_features, out_features) or (bias is not None and bias.shape != (out_features,)):
        raise ValueError(f"panels {tuple(packed.shape)} for a linear of {in_features} -> {out_features}")
    linear = Linear(packed.data_ptr(), None, None, _ptr(bias), None, in_features, out_features, 0)
    linear._tensors = (packed, bias)
    return linear


def kernel_linear(fn: int, w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor | None, group: int,
                  in_features: int, out_features: int, bias: torch.Tensor | None) -> Linear:
    """The linear computed by another library's kernel at address ``fn`` (quant_kernels'
    ``int8_matmul``, ``int4_linear``: ``fn(x, M, k, w, scale, zero, n, group, y, threads)``) on its
    weight ``w`` and fp32 block constants ``scale``, ``zero`` [out_features, in_features / group],
    plus ``bias`` [out_features]. The caller vouches for ``w``'s layout; the rest is checked (ValueError)."""
    constants = [scale] + ([] if zero is None else [zero]) + ([] if bias is None else [bias])
    _check_contiguous(constants)
    if (not w.is_contiguous() or group <= 0 or in_features % group
            or any(c.shape != (out_features, in_features // group) for c in constants[: 1 + (zero is not None)])
            or (bias is not None and bias.shape != (out_features,))):
        raise ValueError(f"kernel operands for a linear of {in_features} -> {out_features} in groups of {group}")
    linear = Linear(w.data_ptr(), scale.data_ptr(), _ptr(zero), _ptr(bias), fn, in_features, out_features, group)
    linear._tensors = (w, scale, zero, bias)
    return linear


def _ptr(t: torch.Tensor | None) -> int | None:
    return None if t is None else t.data_ptr()


def _panels_of(packed: torch.Tensor, k: int, n: int) -> bool:
    """Whether ``packed`` is the panels of a [n, k] weight (ValueError where they are not aligned)."""
    _check_aligned(packed)
    return packed.shape == ((n + PANEL - 1) // PANEL, k, PANEL)


def _check_aligned(packed: torch.Tensor) -> None:
    """The kernel loads each k's PANEL weights as one aligned 64-byte vector (a misaligned one faults)."""
    if packed.data_ptr() % 64:
        raise ValueError(f"panels at address {packed.data_ptr():#x} are not 64-byte aligned (pack() output is)")


def _check_contiguous(operands: list[torch.Tensor]) -> None:
    for t in operands:
        _check_fp32(t)
        if not t.is_contiguous():
            raise ValueError(f"operand {tuple(t.shape)} is not contiguous")


def _check_fp32(t: torch.Tensor) -> None:
    if t.dtype is not torch.float32 or not t.is_cpu:
        raise ValueError(f"panel matmul operands are fp32 CPU tensors, not {t.dtype} on {t.device}")


@functools.cache
def load() -> PanelKernels | None:
    """The kernels, built if needed; None (logged once) where they cannot be built or are turned off."""
    if os.environ.get("RYZ_CPU_MATMUL", "panel") == "onednn":
        return None
    try:
        return PanelKernels(ctypes.CDLL(str(build_library(SOURCE, FLAGS, stem="panel", depends=DEPENDS))))
    except (OSError, subprocess.SubprocessError) as e:
        log.warning("panel matmul kernels unavailable (%s): fp32 CPU linears use oneDNN", e)
        return None
