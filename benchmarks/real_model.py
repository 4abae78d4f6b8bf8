"""Real trained models for the benchmarks: a checkpoint directory or a GGUF file, and varied text prompts.

A GGUF file is dequantized once to an fp32 transformers directory with transformers' own GGUF
loader (``gguf`` package), cached under the ryzanstein cache directory, so that the benchmarks
measure the very weights the file holds.
"""

from __future__ import annotations

import hashlib
import json
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
        _keep_chat_template(path, out)  # (directories written before it was carried over)
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
    _keep_chat_template(path, tmp)
    try:
        os.replace(tmp, out)
    except OSError:  # another process wrote it meanwhile
        shutil.rmtree(tmp)
        if not out.is_dir():
            raise
    return out


def _keep_chat_template(gguf: Path, model_dir: Path) -> None:
    """Write the GGUF file's chat template into ``model_dir``'s tokenizer config where transformers'
    GGUF loader dropped it (Gemma 3's)."""
    config_path = model_dir / "tokenizer_config.json"
    config = json.loads(config_path.read_text())
    if config.get("chat_template") or (model_dir / "chat_template.jinja").exists():
        return
    from gpu_workers.model.gguf_file import metadata, open_reader

    template = metadata(open_reader(gguf)).get("tokenizer.chat_template")
    if isinstance(template, str):
        config["chat_template"] = template
        config_path.write_text(json.dumps(config, indent=2))


def text_prompts(model_dir: Path) -> list[tuple[str, list[int]]]:
    """(kind, token ids) of ``PROMPTS`` under the model's own tokenizer and chat template (without
    one, chat turns as plain "User: ... Assistant:" text; untemplated text starts with BOS where
    the tokenizer adds one)."""
    import transformers

    tok = transformers.AutoTokenizer.from_pretrained(model_dir)
    out = []
    for kind, text in PROMPTS:
        templated = (kind == "chat" or kind == "long") and tok.chat_template is not None
        if templated:  # (the template writes BOS itself where the model wants one)
            text = tok.apply_chat_template([{"role": "user", "content": text}], tokenize=False,
                                           add_generation_prompt=True)
        elif kind == "chat" or kind == "long":  # a base model (Gemma 3 270M's file has no template)
            text = f"User: {text}\nAssistant:"
        out.append((kind, tok(text, add_special_tokens=not templated).input_ids))
    return out
