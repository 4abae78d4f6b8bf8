"""The fused decoder path (gpu_workers/model/fused_decoder.py): the same logits, bit for bit, as the
module path, for every Llama-family variant it takes and every KV cache format; the others keep the
module path."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from gpu_workers.model import fused_decoder, layer_kernels, panel_matmul
from gpu_workers.model.kv_cache import KV_FORMATS
from gpu_workers.model_runner import Chunk, ModelRunner
from tests.gpu_workers.model.hf_models import VOCAB, build, save
from tests.gpu_workers.model.test_request_independence import Blocks

pytestmark = pytest.mark.skipif(panel_matmul.load() is None or layer_kernels.load() is None,
                                reason="no C compiler: no panel or layer kernels")
FUSED = ["llama-gqa", "llama-mqa-tied", "llama-bias-headdim-linear", "mistral", "qwen2", "phi3-sliding",
         "qwen3-bias-sliding", "gemma3"]  # Qwen3's and Gemma's query/key norms; Gemma's own layer
PROMPTS = [[3, 17, 5, 9, 30, 2, 11], [8, 1, 4, 4, 22, 19, 7, 13, 2, 6, 25, 14, 0, 5, 16, 3, 9, 27], [12]]
STEPS = 4


@pytest.fixture(scope="module", autouse=True)
def small_weights_packed() -> Iterator[None]:
    """These test models' weights are below the size packed in panels: pack them all here."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(panel_matmul, "MIN_WEIGHTS", 1)
        yield


@pytest.fixture(scope="module")
def model_dirs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    return {name: save(build(name, std=0.3), tmp_path_factory.mktemp(name)) for name in FUSED}


def batched_run(runner: ModelRunner) -> torch.Tensor:
    """Logits [(1 + STEPS) * 3, vocab]: the three prompts prefilled in one step, then STEPS decode
    steps of all three (greedy), a fresh cache."""
    runner.allocate_kv_cache(48)
    blocks = Blocks(runner)
    tables = [blocks.take(12, first=True) for _ in PROMPTS]
    staging = [blocks.staging() for _ in PROMPTS]
    logits = runner.run([Chunk(p, 0, t, True, staging=s) for p, t, s in zip(PROMPTS, tables, staging)])
    out, lengths = [logits], [len(p) for p in PROMPTS]
    for _ in range(STEPS):
        tokens = [int(row.argmax()) % VOCAB for row in logits]
        logits = runner.run([Chunk([tok], n, t, True, staging=s)
                             for tok, n, t, s in zip(tokens, lengths, tables, staging)])
        lengths = [n + 1 for n in lengths]
        out.append(logits)
    return torch.cat(out)


@pytest.mark.parametrize("kv_dtype", list(KV_FORMATS))
@pytest.mark.parametrize("name", FUSED)
def test_the_fused_path_gives_the_module_path_s_bits(model_dirs: dict[str, Path], name: str, kv_dtype: str,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    runner = ModelRunner(model_dirs[name], num_blocks=None, block_size=4, kv_dtype=kv_dtype)
    fused = runner.model._fused
    assert fused is not None, f"{name} should take the fused path"
    calls = []
    monkeypatch.setattr(fused_decoder.FusedDecoder, "__call__",
                        lambda self, *a: calls.append(1) or original(self, *a))
    fused_logits = batched_run(runner)
    assert len(calls) == 1 + STEPS
    runner.model._fused = None
    module_logits = batched_run(runner)
    assert torch.equal(fused_logits, module_logits)


original = fused_decoder.FusedDecoder.__call__


def test_layers_the_c_halves_do_not_compute_keep_the_module_path(model_dirs: dict[str, Path]) -> None:
    """A Llama layer of another activation than SiLU (its C half computes SiLU), a Gemma layer whose
    norms differ in eps (the C halves take one), q/k norms of another eps than each other: no fused path."""
    for name, spoil in [("llama-gqa", lambda m: setattr(m.model.layers[1].mlp, "act", torch.nn.functional.gelu)),
                        ("gemma3", lambda m: setattr(m.model.layers[0].pre_feedforward_layernorm, "eps", 1e-3)),
                        ("qwen3-bias-sliding", lambda m: setattr(m.model.layers[0].self_attn.k_norm, "eps", 1e-3))]:
        model = ModelRunner(model_dirs[name], num_blocks=None, block_size=4, kv_dtype="fp32").model
        assert fused_decoder.prepare(model) is not None, name
        spoil(model)
        assert fused_decoder.prepare(model) is None, name


def test_without_panels_or_layer_kernels_the_module_path_stays(model_dirs: dict[str, Path],
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(layer_kernels, "load", lambda: None)  # as RYZ_LAYER_KERNELS=0
    assert ModelRunner(model_dirs["llama-gqa"], num_blocks=None, block_size=4, kv_dtype="fp32").model._fused is None
    monkeypatch.undo()
    monkeypatch.setattr(panel_matmul, "load", lambda: None)  # as RYZ_CPU_MATMUL=onednn
    assert ModelRunner(model_dirs["llama-gqa"], num_blocks=None, block_size=4, kv_dtype="fp32").model._fused is None
