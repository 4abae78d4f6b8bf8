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
    calls: list[str] = []
    monkeypatch.setattr(fused_decoder.FusedDecoder, "__call__",
                        lambda self, *a: calls.append("step") or original(self, *a))
    monkeypatch.setattr(panel_matmul.PanelKernels, "decoder_layers",
                        lambda self, *a: calls.append("layers") or original_layers(self, *a))
    monkeypatch.setattr(panel_matmul, "attend", lambda *a: calls.append("attend") or original_attend(*a))
    fused_logits = batched_run(runner)
    assert calls.count("step") == 1 + STEPS
    # The decode steps' attention: the cache's C function where it has one (fp32, and fp8_e4m3 whose
    # blocks complete during these steps at block size 4), in one C call for the whole step where every
    # layer attends to the whole context (no sliding window, no Gemma layer with its torch GeLU); here
    # every sliding window is narrower than the longest prompt, so those layers keep the module path.
    windows = [layer.self_attn.attn.sliding_window for layer in runner.model.model.layers]
    if kv_dtype not in ("fp32", "fp8_e4m3"):
        assert "attend" not in calls and "layers" not in calls
    elif name == "gemma3" or any(windows):
        assert calls.count("attend") == STEPS * windows.count(None) and "layers" not in calls
    else:
        assert calls.count("layers") == STEPS and "attend" not in calls
    runner.model._fused = None
    module_logits = batched_run(runner)
    assert torch.equal(fused_logits, module_logits)


original = fused_decoder.FusedDecoder.__call__
original_layers = panel_matmul.PanelKernels.decoder_layers
original_attend = panel_matmul.attend


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


@pytest.mark.parametrize("kv_dtype", ["fp32", "fp8_e4m3"])
def test_the_c_attention_refuses_a_step_outside_the_cache(model_dirs: dict[str, Path], kv_dtype: str) -> None:
    """A write slot, a block id or a length outside the cache: KernelError, and a refused write leaves
    the pools as they were."""
    from gpu_workers.model.fp8_kernels import AttentionStep, KernelError

    runner = ModelRunner(model_dirs["llama-gqa"], num_blocks=None, block_size=4, kv_dtype=kv_dtype)
    runner.allocate_kv_cache(8)
    cache = runner.kv_cache
    attn = runner.model.model.layers[0].self_attn
    kernel = cache.attention_kernel(attn.attn.cache_layer, heads=attn.num_heads, scale=attn.attn.scale)
    assert kernel is not None
    qkv = torch.randn(1, (attn.num_heads + 2 * attn.num_kv_heads) * attn.head_dim)
    context = torch.empty(1, attn.num_heads * attn.head_dim)
    staged = kv_dtype == "fp8_e4m3"
    first = cache.num_blocks if staged else 0  # a valid block: the staged cache's first dense block (a sink)
    ids = cache.num_blocks + cache.num_dense_blocks  # the id space of the table
    slots = 4 * (cache.num_dense_blocks if staged else cache.num_blocks)  # of the write (dense for staged)

    def attend(slot: int, block: int, length: int) -> None:
        tables, lens, where, rows = (torch.tensor(v) for v in ([[block]], [length], [slot], [0]))
        step = AttentionStep(tables.data_ptr(), lens.data_ptr(), where.data_ptr(), 1, 1)
        if staged:  # the plan's bf16 write of the token (row 0) at its dense slot
            step.dense_rows, step.dense_slots, step.nd = rows.data_ptr(), where.data_ptr(), 1
        panel_matmul.attend(*kernel, step, qkv, context)

    attend(0, first, 1)  # a valid step
    for slot, block, length in [(slots, first, 1), (-1, first, 1), (0, ids, 1), (0, -1, 1), (0, first, 5),
                                (0, first, 0)]:
        before = (cache.dense if staged else cache.values).clone()
        with pytest.raises(KernelError):
            attend(slot, block, length)
        if slot != 0:
            assert torch.equal(cache.dense if staged else cache.values, before)


def test_a_step_whose_staged_plan_does_not_add_up_keeps_the_module_path() -> None:
    """The C code reads block_size sources per completed block and a slot per dense row: a plan
    where those counts disagree (or a table of another batch) is not handed to it."""
    from types import SimpleNamespace

    from gpu_workers.model.attention_metadata import AttentionBatch
    from gpu_workers.model.decode_backends import StagedMetadata
    from gpu_workers.model.kv_staged import StagedWrites

    def step(complete_src: int, dense_slots: int, table_rows: int = 1) -> object:
        i64 = lambda n: torch.zeros(n, dtype=torch.int64)
        plan = StagedWrites(dense_rows=i64(1), dense_slots=i64(dense_slots), complete_blocks=i64(1),
                            complete_src=i64(complete_src), staged_slots=i64(3), late_rows=i64(0), late_slots=i64(0))
        meta = StagedMetadata(0, 1, torch.zeros(table_rows, 2, dtype=torch.int64), torch.tensor([5]), None)
        backend = SimpleNamespace(cache=SimpleNamespace(block_size=4))
        batch = AttentionBatch(slot_mapping=torch.tensor([5]), decode_backend=backend,  # type: ignore[arg-type]
                               num_decode=1, decode_groups=[meta], staged=plan)
        return fused_decoder.attention_step(batch, 1)

    assert step(4, 1) is not None
    assert step(3, 1) is None and step(5, 1) is None  # one completed block of 4 tokens: 4 sources
    assert step(4, 0) is None and step(4, 2) is None  # one dense row: one dense slot
    assert step(4, 1, table_rows=2) is None
