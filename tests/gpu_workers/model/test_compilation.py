"""The compiled decoder (torch.compile, inductor C++) against eager and transformers, on one tiny
checkpoint: the only test that pays a compile (1.5-5 minutes on two loaded cores; inductor caches
its kernels under /tmp, so later runs on a machine are faster)."""

from __future__ import annotations

import argparse
import random
from pathlib import Path

import pytest

from gpu_workers.cli import compilation_level
from gpu_workers.model_runner import Chunk, ModelRunner
from tests.gpu_workers.model.hf_models import assert_close, build, random_tokens, reference_logits, save

REL = 1e-4


@pytest.mark.slow
@pytest.mark.timeout(900)  # a cold compile took ~5 minutes under a load of 13 on 2 cores (~1.5 warm)
def test_compiled_steps_match_eager_and_transformers(tmp_path: Path) -> None:
    """Gemma 3 (sliding-window and global layers with their own RoPE, q/k norms, soft-capped
    logits): prefill chunks, decode batches of three and of one, compiled, give transformers'
    logits and eager's greedy tokens."""
    hf = build("gemma3")
    path = save(hf, tmp_path)
    rng = random.Random(3)
    prompts = [random_tokens(rng, n) for n in (9, 4, 13)]
    tables = [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9, 10, 11]]  # 4 blocks of 8 tokens: room to decode
    compiled = ModelRunner(path, num_blocks=12, block_size=8)
    eager = ModelRunner(path, num_blocks=12, block_size=8)
    assert compiled.compile()
    seqs = [list(p) for p in prompts]
    live = [0, 1, 2]
    runs = [r.run([Chunk(p, 0, t, True) for p, t in zip(prompts, tables)]) for r in (compiled, eager)]
    for step in range(8):
        for row, i in enumerate(live):
            ref = reference_logits(hf, seqs[i])[-1]
            assert_close(runs[0][row], ref, rel=REL, what=f"compiled, step {step}, sequence {i}")
            top2 = runs[1][row].topk(2).values
            assert top2[0] - top2[1] > 1e-3, "test model lacks a clear greedy margin"
            assert int(runs[0][row].argmax()) == int(runs[1][row].argmax())
            seqs[i].append(int(runs[1][row].argmax()))
        live = live if step < 5 else [0]  # then a single sequence: the one-token graph
        runs = [r.run([Chunk([seqs[i][-1]], len(seqs[i]) - 1, tables[i], True) for i in live])
                for r in (compiled, eager)]


def test_compilation_config_levels() -> None:
    """vLLM's spellings: a bare level or JSON; levels other than 0 and 3 are refused."""
    assert compilation_level("3") == 3 and compilation_level('{"level": 0}') == 0
    for bad in ("2", '{"mode": 3}', "fast"):
        with pytest.raises(argparse.ArgumentTypeError):
            compilation_level(bad)


def test_a_staged_fp8_cache_stays_eager(tmp_path: Path) -> None:
    """The staged fp8_e4m3 cache (the default) is not compiled yet: compile() says so and changes nothing."""
    path = save(build("gemma3"), tmp_path)
    runner = ModelRunner(path, num_blocks=12, block_size=8, kv_dtype="fp8_e4m3")
    before = runner.model.forward
    assert not runner.compile()
    assert runner.model.forward == before
