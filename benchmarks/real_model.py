"""Real trained models for the benchmarks: a checkpoint directory or a GGUF file, and varied text prompts.

A GGUF file is dequantized once to an fp32 transformers directory with transformers' own GGUF
loader (``gguf`` package), cached under the ryzanstein cache directory, so that the benchmarks
measure the very weights the file holds.
"""

from __future__ import annotations

import hashlib
import os
import shutil
from pathlib import Path

from gpu_workers.model.presets import default_cache_dir

_SUMMARY_TEXT = (
    "The committee met on Tuesday to discuss the budget for the new library, which had been delayed twice "
    "because of rising construction costs and disagreements about its location near the river. "
)
# (kind, text or chat question): chat turns go through the model's chat template
PROMPTS: list[tuple[str, str]] = [
    ("chat", "What is 2+2? Answer with one number."),
    ("chat", "Write a short poem about the sea."),
    ("chat", "Explain how a hash map works in three sentences."),
    ("code", 'def fibonacci(n):\n    """Return the n-th Fibonacci number."""\n'),
    ("code", "import numpy as np\n\n\ndef softmax(x):\n"),
    ("prose", "The history of the Roman Empire begins with"),
    ("prose", "Once upon a time, in a small village by the mountains, there lived"),
    ("long", "Summarize the following text.\n\n" + _SUMMARY_TEXT * 12),
]


def model_dir_of(path: Path) -> Path:
    """``path`` itself for a checkpoint directory; for a ``.gguf`` file, its dequantized fp32
    transformers directory (written once under the cache directory, keyed by the file's size and mtime)."""
    if path.is_dir():
        return path
    if path.suffix != ".gguf":
        raise ValueError(f"{path}: expected a checkpoint directory or a .gguf file")
    stat = path.stat()
    key = hashlib.sha256(f"{path.resolve()}:{stat.st_size}:{stat.st_mtime_ns}".encode()).hexdigest()[:12]
    out = default_cache_dir() / "bench-models" / f"{path.stem}-{key}"
    if out.is_dir():
        return out
    import transformers

    quantized = transformers.AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype="float32")
    # transformers will not save a GGUF-loaded model: copy its tensors into a plain one
    model = transformers.AutoModelForCausalLM.from_config(quantized.config, dtype="float32")
    model.load_state_dict(quantized.state_dict())
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    tmp = out.with_name(out.name + f".tmp{os.getpid()}")
    model.save_pretrained(tmp)
    transformers.AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name).save_pretrained(tmp)
    try:
        os.replace(tmp, out)
    except OSError:  # another process wrote it meanwhile
        shutil.rmtree(tmp)
        if not out.is_dir():
            raise
    return out


def text_prompts(model_dir: Path) -> list[tuple[str, list[int]]]:
    """(kind, token ids) of ``PROMPTS`` under the model's own tokenizer and chat template."""
    import transformers

    tok = transformers.AutoTokenizer.from_pretrained(model_dir)
    out = []
    for kind, text in PROMPTS:
        if kind == "chat" or kind == "long":
            text = tok.apply_chat_template([{"role": "user", "content": text}], tokenize=False,
                                           add_generation_prompt=True)
        out.append((kind, tok(text, add_special_tokens=False).input_ids))
    return out
