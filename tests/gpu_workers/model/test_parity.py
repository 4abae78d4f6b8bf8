"""Logits of ModelRunner against transformers on the same random checkpoints (fp32)."""

from __future__ import annotations

import random
from pathlib import Path

import pytest
import torch

from gpu_workers.model import cpu_matmul, panel_matmul
from gpu_workers.model.kv_cache import KVCache
from gpu_workers.model_runner import Chunk, ModelRunner
from tests.gpu_workers.model.hf_models import (
    BASE,
    CONFIGS,
    assert_close,
    build,
    random_tokens,
    reference_logits,
    save,
)
from tests.gpu_workers.model.test_request_independence import FP8_TOLERANCE, TOLERANCE

REL = 1e-4


def _block_tables(rng: random.Random, lengths: list[int], block_size: int, num_blocks: int) -> list[list[int]]:
    """Non-contiguous, shuffled blocks covering each length."""
    pool = list(range(num_blocks))
    rng.shuffle(pool)
    tables = []
    for n in lengths:
        need = -(-n // block_size)
        tables.append(pool[:need])
        del pool[:need]
    return tables


@pytest.fixture(scope="module", params=sorted(CONFIGS))
def checkpoint(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> tuple[str, Path, object]:
    name = request.param
    model = build(name)
    return name, save(model, tmp_path_factory.mktemp(name)), model


def test_whole_prompts_in_one_run(checkpoint: tuple[str, Path, object]) -> None:
    """(a) a batch of prompts of different lengths, each prefilled whole, in one run."""
    name, path, hf = checkpoint
    rng = random.Random(1)
    # 60 > max_position_embeddings of the dynamic-RoPE config: its scaling is exercised
    prompts = [random_tokens(rng, n) for n in (13, 1, 60, 7, 2)]
    runner = ModelRunner(path, num_blocks=64, block_size=4)
    tables = _block_tables(rng, [len(p) for p in prompts], 4, 64)
    logits = runner.run([Chunk(p, 0, t, True) for p, t in zip(prompts, tables)])
    assert logits.shape == (len(prompts), runner.config.vocab_size) and logits.dtype == torch.float32
    # transformers' dynamic RoPE keeps state across calls; growing lengths make each call exact
    for i in sorted(range(len(prompts)), key=lambda i: len(prompts[i])):
        ref = reference_logits(hf, prompts[i])[-1]
        assert_close(logits[i], ref, rel=REL, what=f"{name} prompt {i} ({len(prompts[i])} tokens)")


def test_packed_weights(checkpoint: tuple[str, Path, object], monkeypatch: pytest.MonkeyPatch) -> None:
    """Every linear packed (in panels, or for oneDNN where the panel kernel is not built; the
    thresholds lowered to pack these small ones): same logits, dense copies freed, except a tied LM
    head's, which the embedding still reads."""
    if panel_matmul.load() is None and not cpu_matmul.onednn_available():
        pytest.skip("neither the panel kernel nor oneDNN's linear here")
    monkeypatch.setattr(cpu_matmul, "ONEDNN_MIN_WEIGHTS", 0)
    monkeypatch.setattr(panel_matmul, "MIN_WEIGHTS", 0)
    name, path, hf = checkpoint
    rng = random.Random(3)
    prompts = [random_tokens(rng, n) for n in (9, 1, 20)]
    runner = ModelRunner(path, num_blocks=64, block_size=4)
    model = runner.model
    assert model.lm_head.packed is not None and model.model.layers[0].mlp.down_proj.weight.numel() == 0
    tied = runner.config.tie_word_embeddings
    assert (model.lm_head.weight.numel() > 0) == tied and model.model.embed_tokens.weight.numel() > 0
    assert runner.weight_bytes() > sum(p.numel() * p.element_size() for p in model.parameters())
    tables = _block_tables(rng, [len(p) for p in prompts], 4, 64)
    logits = runner.run([Chunk(p, 0, t, True) for p, t in zip(prompts, tables)])
    for i, prompt in enumerate(prompts):
        assert_close(logits[i], reference_logits(hf, prompt)[-1], rel=REL, what=f"{name} packed, prompt {i}")


@pytest.mark.parametrize("group_tokens,reads", [(8, "fused"), (None, "in-place"), (8, "in-place"), (8, "gathered")],
                         ids=["fused-kernel", "one-decode-group", "small-decode-groups", "gathered-kv"])
def test_chunked_prefill_and_decode(
    checkpoint: tuple[str, Path, object], group_tokens: int | None, reads: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """(b) prompts in random-size chunks over several runs, then decode steps, every chunk's last
    token compared; chunks shuffled within a run, block tables shuffled and non-contiguous. Decode
    attention over an fp32 cache on CPUs runs in the fused kernel ("fused"), or without it reads the
    cache in place; "gathered" forces the path GPUs and other cache dtypes take."""
    name, path, hf = checkpoint
    real_fused = KVCache.fused_attention
    monkeypatch.setattr(KVCache, "fused_attention",
                        property(lambda self: reads == "fused" and real_fused.fget(self)))  # type: ignore[attr-defined]
    monkeypatch.setattr(KVCache, "reads_in_place", property(lambda self: reads == "in-place"))
    rng = random.Random(2)
    block_size = 4
    prompts = [random_tokens(rng, n) for n in (17, 5, 30, 1)]
    decode_steps = 6
    # whole sequences stay within max_position_embeddings (48 for dynamic RoPE): transformers'
    # dynamic scaling of a whole sequence would differ from one computed chunk by chunk
    sequences = [p + random_tokens(rng, decode_steps) for p in prompts]
    tables = _block_tables(rng, [len(s) for s in sequences], block_size, 64)
    runner = ModelRunner(path, num_blocks=64, block_size=block_size, decode_group_tokens=group_tokens)
    if reads == "fused" and not runner.kv_cache.fused_attention:
        pytest.skip("no C compiler: the fused kernels cannot be built here")
    refs = [reference_logits(hf, s) for s in sequences]

    done = [0] * len(sequences)
    checked = 0
    while any(d < len(s) for d, s in zip(done, sequences)):
        chunks, owners = [], []
        for i, seq in enumerate(sequences):
            if done[i] == len(seq) or rng.random() < 0.2:  # sometimes a sequence sits a step out
                continue
            in_prompt = done[i] < len(prompts[i])
            n = min(rng.randint(1, 8), len(prompts[i]) - done[i]) if in_prompt else 1
            chunks.append(Chunk(seq[done[i] : done[i] + n], done[i], tables[i], want_logits=rng.random() < 0.8))
            owners.append(i)
        order = list(range(len(chunks)))
        rng.shuffle(order)
        chunks, owners = [chunks[j] for j in order], [owners[j] for j in order]
        if not chunks:
            continue
        logits = runner.run(chunks)
        assert logits.shape[0] == sum(c.want_logits for c in chunks)
        row = 0
        for chunk, i in zip(chunks, owners):
            end = chunk.start + len(chunk.token_ids)
            if chunk.want_logits:
                assert_close(logits[row], refs[i][end - 1], rel=REL, what=f"{name} seq {i} at {end - 1}")
                row += 1
                checked += 1
            done[i] = end
    assert checked >= 20


def test_prefix_shared_blocks(checkpoint: tuple[str, Path, object]) -> None:
    """A second sequence reuses the first one's cached prefix blocks (a prefix-cache hit)."""
    name, path, hf = checkpoint
    rng = random.Random(3)
    prefix = random_tokens(rng, 8)  # two whole blocks of 4
    a, b = prefix + random_tokens(rng, 5), prefix + random_tokens(rng, 9)
    runner = ModelRunner(path, num_blocks=16, block_size=4)
    runner.run([Chunk(a, 0, [7, 2, 9, 4], True)])
    logits = runner.run([Chunk(b[8:], 8, [7, 2, 11, 5, 0], True), Chunk([3], len(a), [7, 2, 9, 4], True)])
    assert_close(logits[0], reference_logits(hf, b)[-1], rel=REL, what=f"{name} prefix hit")
    assert_close(logits[1], reference_logits(hf, a + [3])[-1], rel=REL, what=f"{name} decode after it")


def test_sharded_checkpoint(tmp_path: Path) -> None:
    """(c) save_pretrained with a small max_shard_size writes model.safetensors.index.json."""
    hf = build("qwen2")
    path = save(hf, tmp_path, max_shard_size="100KB")
    assert (path / "model.safetensors.index.json").is_file()
    assert len(list(path.glob("*.safetensors"))) > 2
    rng = random.Random(4)
    prompt = random_tokens(rng, 11)
    runner = ModelRunner(path, num_blocks=8, block_size=16)
    logits = runner.run([Chunk(prompt, 0, [3], True)])
    assert_close(logits[0], reference_logits(hf, prompt)[-1], rel=REL, what="sharded qwen2")


def test_greedy_generation_matches(tmp_path: Path) -> None:
    """Greedy decoding picks the same tokens as transformers (margins checked to be clear)."""
    hf = build("llama-gqa", std=0.3)
    path = save(hf, tmp_path)
    rng = random.Random(5)
    prompts = [random_tokens(rng, n) for n in (6, 3, 11)]
    runner = ModelRunner(path, num_blocks=32, block_size=4)
    tables = _block_tables(rng, [len(p) + 10 for p in prompts], 4, 32)
    seqs = [list(p) for p in prompts]
    logits = runner.run([Chunk(p, 0, t, True) for p, t in zip(prompts, tables)])
    for _ in range(10):
        for s, row in zip(seqs, logits):
            ref = reference_logits(hf, s)[-1]
            top2 = ref.topk(2).values
            assert top2[0] - top2[1] > 1e-3, "test model lacks a clear greedy margin"
            assert int(row.argmax()) == int(ref.argmax())
            s.append(int(row.argmax()))
        logits = runner.run([Chunk([s[-1]], len(s) - 1, t, True) for s, t in zip(seqs, tables)])


@pytest.mark.parametrize("kv_dtype", ["fp32", "bf16", "fp8_e4m3", "fp8_e4m3_block", "fp8_e5m2", "fp8_e4m3_per_tensor"])
@pytest.mark.parametrize("name", ["gemma3", "mistral"])
def test_sliding_windows_read_the_same_keys_in_decode_and_prefill(tmp_path: Path, name: str, kv_dtype: str) -> None:
    """In every KV format, a sliding-window layer's decode (block tables cut to the window) and a
    prefill chunk's read (the window's slots gathered) see the same cached keys: a token decoded
    alone and the same token ending a two-token chunk get the same logits, along a sequence
    five times the window. (Against transformers, these formats differ by their rounding.)

    Same up to the format's rounding, not bit for bit: the alone token's projections are 1-row
    matmuls and the chunk's 2-row ones, and CPU BLAS does not promise one row's bits independent of
    the row count (MKL's SGEMM on an AVX2 EPYC, torch 2.13: row 0 of n=1 differs from n=2, n=2..3
    agree, n>=4 differ again; oneDNN: n=1 alone differs). The K/V written then differ by ~1e-7
    relative, and a stored value can round to the neighbouring code: one bf16 code moved mistral's
    logits by 1.8e-4 of their scale there. So each format gets test_request_independence's
    rounding tolerance (1e-5 for fp32, where nothing rounds). Reading one key outside the window in
    prefill (``keys >= queries - window``, the off-by-one this guards) moved them by 0.2..1.1 of the
    scale at the first position past the window (up to 0.67..1.7 along the sequence) in every
    format: 20x or more above the widest tolerance."""
    path = save(build(name), tmp_path)
    rng = random.Random(6)
    seq = random_tokens(rng, 31)
    table = [9, 3, 12, 0, 5, 7, 1, 14]
    decoded, chunked = (ModelRunner(path, num_blocks=16, block_size=4, kv_dtype=kv_dtype) for _ in "ab")
    staging: tuple[int, ...] = ()
    if decoded.kv_format.staged:  # block 0 and the staging block are dense blocks (ids 16 on)
        table, staging = [16, *table[1:]], (17,)
    for runner in (decoded, chunked):
        runner.run([Chunk(seq[:11], 0, table, False, staging=staging)])
    rel = FP8_TOLERANCE if decoded.kv_cache.fp8 else TOLERANCE[kv_dtype]
    for p in range(11, 31, 2):
        decoded.run([Chunk([seq[p]], p, table, False, staging=staging)])
        alone = decoded.run([Chunk([seq[p + 1]], p + 1, table, True, staging=staging)])[0]
        in_chunk = chunked.run([Chunk(seq[p : p + 2], p, table, True, staging=staging)])[0]
        assert_close(alone, in_chunk, rel=rel, what=f"{name} {kv_dtype} at {p + 1}")


def test_gemma3_multimodal_checkpoint_serves_its_text_model(tmp_path: Path) -> None:
    """A ``Gemma3ForConditionalGeneration`` checkpoint (Gemma 3 4B and up): its text model loads from
    the ``language_model.`` tensors, the vision tower is left unread, and text logits equal
    transformers' multimodal model's on a text-only prompt (which, unlike Gemma3ForCausalLM, does
    not apply the text config's final_logit_softcapping: 3.0 here)."""
    import transformers

    text = transformers.Gemma3TextConfig(**{**BASE, **CONFIGS["gemma3"][1]})
    vision = transformers.SiglipVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                             num_attention_heads=2, image_size=32, patch_size=8)
    config = transformers.Gemma3Config(text_config=text, vision_config=vision, mm_tokens_per_image=4,
                                       image_token_index=299, boi_token_index=297, eoi_token_index=298)
    torch.manual_seed(0)
    hf = transformers.Gemma3ForConditionalGeneration(config).eval()
    with torch.no_grad():
        for pname, p in hf.named_parameters():
            p.uniform_(0.5, 1.5) if "norm" in pname else p.normal_(0.0, 0.1)
    path = save(hf, tmp_path)
    rng = random.Random(7)
    prompt = [rng.randrange(297) for _ in range(20)]  # text only: no image, begin- or end-of-image token
    runner = ModelRunner(path, num_blocks=16, block_size=4)
    assert runner.config.checkpoint_prefix == "language_model." and runner.config.layer_window(0) == 6
    assert runner.config.final_logit_softcapping is None
    table = [4, 9, 1, 12, 7, 0]
    logits = [runner.run([Chunk(prompt[:13], 0, table, True)])[0]]
    logits += [runner.run([Chunk([t], 13 + i, table, True)])[0] for i, t in enumerate(prompt[13:])]
    with torch.no_grad():
        ref = hf(input_ids=torch.tensor([prompt])).logits[0].float()
    for i, row in enumerate(logits):
        assert_close(row, ref[12 + i], rel=REL, what=f"multimodal gemma3 at {12 + i}")
