"""Greedy decoding's LM head at half the bytes, its tokens exactly those of the fp32 head.

At temperature 0 (no logprobs, no logit controls, no grammar) a step needs each row's argmax of the
logits, not the logits. At small batches the fp32 head is a read of its weights: SmolLM2-135M's,
49152 x 576, are 113 MB of a 540 MB decode step, Gemma 3 270M's, 262144 x 640, 671 MB of ~1 GB.
``GreedyHead`` reads a bf16 copy instead (``bf16_screen``, panel_matmul.c), bounds how far each
screened logit can be from the one the fp32 head computes, and computes in fp32, with the fp32 head's
own kernel (``matmul_units``: the same tiles, the same bits), only the logits whose upper bound
reaches the best one's lower bound. Every other logit is provably below the argmax, so the token is
the fp32 head's (ties: the lowest id, as ``torch.argmax``).

The bound, per output n and row x [K] (w_n the fp32 weights, b_n their bf16 rounding, x' the inputs
as the screen multiplies them: rounded to bf16 with AVX512-BF16, else x itself; u = 2^-24,
g = K u / (1 - K u)):

    |fp32 logit - screened logit| <= ||x|| (||w_n - b_n|| + g ||w_n||) + ||b_n|| (||x - x'|| + g ||x'||)

(w x - b x' = (w - b) x + b (x - x'), Cauchy-Schwarz on each; g bounds the rounding of a sum of K
products in fp32 in any order, for each of the two sums: Higham, "Accuracy and Stability of Numerical
Algorithms", 2nd ed., sec. 3.1), the weights' norms taken in float64 at load and the inputs' at each
step, with a relative margin and an absolute term for the denormal results vdpbf16ps flushes (its
denormal inputs, weights or x', count as zeros in b_n and x'). vdpbf16ps is taken to round as Intel's
manual describes it, each pair of products two fused multiply-adds rounded to nearest even: K roundings
a sum, as g assumes (measured bit for bit on the AMD EPYC development VM). Where a value
is not finite, a row has more than ``MAX_CANDIDATES`` candidates, or the step has more than
``MAX_ROWS`` rows, ``tokens`` returns None and the caller computes the logits.

``RYZ_GREEDY_SCREEN=0`` turns it off (A/B measurements).
"""

from __future__ import annotations

import ctypes
import logging
import os

import torch

from gpu_workers.model import huge_pages, panel_matmul

log = logging.getLogger(__name__)

UNIT_ROUNDOFF = 2.0**-24  # fp32
MARGIN = 1.0 + 1e-6  # on each bound, for the float64 arithmetic that computes it
MAX_CANDIDATES = 64  # a row with more: the full head (each candidate computes its unit of the fp32 head)
MAX_ROWS = 4  # steps of more rows compute the full logits (the screen would read its weights twice: SCREEN_ROWS)
OVERFLOW = 1e36  # ||x|| ||w_n|| above this: an fp32 logit could overflow, the full head decides
SMALLEST_NORMAL = 2.0**-126  # fp32's and bf16's
NORM_ROWS = 8192  # head rows whose norms are taken at once, in float64


def enabled() -> bool:
    return os.environ.get("RYZ_GREEDY_SCREEN", "1") != "0"


class ScreenKernels:
    """The screen's entry points in panel_matmul.c's library, typed; ValueError for operands the C code
    would misread."""

    def __init__(self, kernels: panel_matmul.PanelKernels) -> None:
        lib = kernels.lib
        p, i = ctypes.c_void_p, ctypes.c_int64
        lib.bf16_screen.argtypes = [p, p, i, i, p, i, p, ctypes.c_int]
        lib.bf16_screen.restype = ctypes.c_int
        lib.bf16_screen_rounds_inputs.argtypes = []
        lib.bf16_screen_rounds_inputs.restype = ctypes.c_int
        lib.greedy_candidates.argtypes = [p, i, i, p, p, p, p, ctypes.c_double, ctypes.c_double, p, i, p]
        lib.greedy_candidates.restype = ctypes.c_int
        self._lib = lib
        self.rounds_inputs = bool(lib.bf16_screen_rounds_inputs())  # bf16_screen's x: rounded to bf16 (vdpbf16ps)

    @staticmethod
    def panels(packed: torch.Tensor) -> torch.Tensor:
        """``PanelKernels.pack``'s fp32 panels [P, K, 16] (K even) as ``bf16_screen`` reads them: rounded
        to bf16, inputs in pairs, [P, K / 2, 16, 2]."""
        count, k, width = packed.shape
        if k % 2:
            raise ValueError(f"{k} inputs: bf16_screen takes them in pairs")
        return packed.view(count, k // 2, 2, width).transpose(2, 3).to(torch.bfloat16).contiguous()

    def bf16_screen(self, x: torch.Tensor, panels: torch.Tensor, out_features: int) -> torch.Tensor:
        """``x`` [M, K] fp32 times a weight of ``out_features`` rows in bf16 pair ``panels`` (``panels``),
        summed in fp32: [M, out_features]; with ``rounds_inputs``, of ``x`` rounded to bf16."""
        k = x.shape[-1] if x.dim() == 2 else -1
        if (x.dtype != torch.float32 or x.dim() != 2 or panels.dim() != 4 or panels.dtype != torch.bfloat16
                or 2 * panels.shape[1] != k or panels.shape[2:] != (panel_matmul.PANEL, 2)
                or panels.shape[0] != (out_features + panel_matmul.PANEL - 1) // panel_matmul.PANEL
                or not x.is_contiguous() or not panels.is_contiguous() or x.shape[0] == 0):
            raise ValueError(f"x {tuple(x.shape)} {x.dtype} against bf16 panels {tuple(panels.shape)} {panels.dtype}")
        pairs = x.to(torch.bfloat16).view(torch.int32)  # [M, K / 2]: inputs 2i (low half), 2i + 1
        out = torch.empty(x.shape[0], out_features)
        if self._lib.bf16_screen(x.data_ptr(), pairs.data_ptr(), x.shape[0], k, panels.data_ptr(), out_features,
                                 out.data_ptr(), torch.get_num_threads()) != 0:
            raise ValueError(f"bf16_screen refused x {tuple(x.shape)} against {tuple(panels.shape)}")
        return out

    def candidates(self, screened: torch.Tensor, bounds: tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor],
                   floor_err: float, cap: int) -> tuple[torch.Tensor, torch.Tensor] | None:
        """For each row of ``screened`` [M, N] (fp32), the outputs n whose ``screened + b`` reaches the
        row's largest ``screened - b``, b = ``(sa[m] ea[n] + sb[m] eb[n]) MARGIN + floor_err`` with
        ``bounds`` = (ea, eb [N], sa, sb [M]), float64: (ids [M, cap] int64, counts [M]), row m's first
        counts[m] ids in increasing order; None where a row has more than ``cap`` or a value is not finite."""
        m, n = screened.shape
        ea, eb, sa, sb = (t.contiguous() for t in bounds)
        if (screened.dtype != torch.float32 or not screened.is_contiguous()
                or any(t.dtype != torch.float64 for t in (ea, eb, sa, sb))
                or ea.shape != (n,) or eb.shape != (n,) or sa.shape != (m,) or sb.shape != (m,) or cap < 1):
            raise ValueError(f"screened {tuple(screened.shape)} against bounds {[tuple(t.shape) for t in bounds]}")
        ids = torch.empty(m, cap, dtype=torch.int64)
        counts = torch.empty(m, dtype=torch.int64)
        rc = self._lib.greedy_candidates(screened.data_ptr(), m, n, ea.data_ptr(), eb.data_ptr(), sa.data_ptr(),
                                         sb.data_ptr(), MARGIN, floor_err, ids.data_ptr(), cap, counts.data_ptr())
        return (ids, counts) if rc == 0 else None


class GreedyHead:
    """An fp32 LM head's argmax by a bf16 screen (module docstring). ``weight`` [V, K] fp32 (dense, K
    even), ``packed`` its panels (``PanelKernels.pack``): the fp32 head's operand."""

    def __init__(self, weight: torch.Tensor, packed: torch.Tensor, kernels: panel_matmul.PanelKernels) -> None:
        vocab, k = weight.shape
        if not bool(torch.isfinite(weight).all()) or k * UNIT_ROUNDOFF >= 0.5:
            raise ValueError(f"no screen for a [{vocab}, {k}] head (weights not all finite, or too many inputs)")
        self.kernels, self.packed = kernels, packed
        self.screen = ScreenKernels(kernels)
        self.vocab, self.k = vocab, k
        self.panels = huge_pages.copy_of(ScreenKernels.panels(packed))  # streamed every greedy step (odd K: refused)
        self.gamma = k * UNIT_ROUNDOFF / (1 - k * UNIT_ROUNDOFF)
        self.error_x = torch.empty(vocab, dtype=torch.float64)  # [V]: times ||x||
        self.error_rounded = torch.empty(vocab, dtype=torch.float64)  # [V]: times ||x - x'|| + g ||x'||
        row_norm = torch.empty(vocab, dtype=torch.float64)
        for start in range(0, vocab, NORM_ROWS):  # in float64 a chunk at a time (a whole head would be GBs)
            rows = slice(start, start + NORM_ROWS)
            w64 = weight[rows].double()
            b64 = self.screened(weight[rows].to(torch.bfloat16).double())
            row_norm[rows] = w64.norm(dim=1)
            self.error_x[rows] = (w64 - b64).norm(dim=1) + self.gamma * row_norm[rows]
            self.error_rounded[rows] = b64.norm(dim=1)
        self.max_row_norm = float(row_norm.max())
        # vdpbf16ps flushes denormal results to zero (at most 2^-126 a step; its inputs: ``screened``), twice over
        self.floor_err = k * 2.0**-125

    def screened(self, values: torch.Tensor) -> torch.Tensor:
        """bf16 ``values`` (as float64) as the screen multiplies them: with AVX512-BF16, denormals as zero
        (vdpbf16ps reads them so), so that the rounding terms of the bound count what that loses."""
        if not self.screen.rounds_inputs:
            return values
        return torch.where(values.abs() < SMALLEST_NORMAL, torch.zeros_like(values), values)

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.panels, self.error_x, self.error_rounded))

    def tokens(self, x: torch.Tensor) -> torch.Tensor | None:
        """The argmax over the vocabulary of each row of the fp32 head's logits for ``x`` [M, K] (fp32):
        token ids [M] (int64); None where the screen cannot tell (the caller computes the logits)."""
        if x.dim() != 2 or x.shape[1] != self.k or not 0 < x.shape[0] <= MAX_ROWS or x.dtype != torch.float32:
            return None
        x = x.contiguous()
        x64 = x.double()
        x_norm = x64.norm(dim=1)  # [M]
        if not bool(torch.isfinite(x_norm).all()) or float(x_norm.max()) * self.max_row_norm > OVERFLOW:
            return None
        rounded = self.screened(x.to(torch.bfloat16).double()) if self.screen.rounds_inputs else x64
        x_rounded = (x64 - rounded).norm(dim=1) + self.gamma * rounded.norm(dim=1)  # [M]
        screened = self.screen.bf16_screen(x, self.panels, self.vocab)  # [M, V]
        found = self.screen.candidates(screened, (self.error_x, self.error_rounded, x_norm, x_rounded), self.floor_err,
                                       MAX_CANDIDATES)
        if found is None:
            return None
        ids, counts = found
        rows = [ids[m, : int(counts[m])] for m in range(x.shape[0])]  # each ascending
        units = sorted({int(i) // self.kernels.unit_outputs for row in rows for i in row.tolist()})
        logits = torch.empty(x.shape[0], self.vocab)  # only the candidates' units are written
        self.kernels.matmul_units(x, self.packed, self.vocab, torch.tensor(units, dtype=torch.int64), logits)
        out = torch.empty(x.shape[0], dtype=torch.long)
        for m, row in enumerate(rows):
            values = logits[m, row]
            if not bool(torch.isfinite(values).all()):
                return None
            out[m] = row[values.argmax()]  # the first of equal maxima: the lowest id, as torch.argmax
        return out


def build(weight: torch.Tensor, packed: torch.Tensor | None) -> GreedyHead | None:
    """A screen for the fp32 head ``weight`` [V, K] packed as ``packed`` (panels), or None where there
    is none to build (turned off, no panels, no kernels, a head it cannot bound)."""
    if not enabled() or packed is None or packed.layout is not torch.strided or weight.dtype is not torch.float32:
        return None
    kernels = panel_matmul.load()
    if kernels is None or weight.dim() != 2 or weight.device.type != "cpu":
        return None
    try:
        return GreedyHead(weight, packed, kernels)
    except ValueError as exc:
        log.info("greedy head screen not used: %s", exc)
        return None
