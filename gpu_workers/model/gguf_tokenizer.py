"""A GGUF file's tokenizer, rebuilt as a ``tokenizers`` tokenizer.json from the file's metadata.

A GGUF carries no tokenizer.json: it stores the vocabulary, merges, token types and special token
ids under llama.cpp's ``tokenizer.ggml.*`` keys. This module builds the same tokenizer the way
transformers' ``integrations/gguf/gguf_tokenizer_mapping.py`` does (byte-level BPE for
``tokenizer.ggml.model`` = ``gpt2``, SentencePiece-style BPE with byte fallback for ``llama``, Gemma's
variant of it), with the ``tokenizers`` library alone, so that serving needs no transformers.

One deliberate difference: the ``smollm`` pre-tokenizer splits digits one by one, as the model's own
tokenizer.json and llama.cpp do; transformers' GGUF conversion does not know it and keeps GPT-2's
digit runs (SmolLM2's vocabulary has no multi-digit tokens, so there the two agree).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors

from broker.errors import ConfigError

CONTROL, USER_DEFINED = 3, 4  # llama.cpp's token types (gguf.TokenType)

_LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_QWEN2_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)


def _byte_level_pre_tokenizer(pre: str | None) -> pre_tokenizers.PreTokenizer:
    """How text is split before byte-level BPE, by ``tokenizer.ggml.pre`` (llama.cpp's names)."""
    if pre in (None, "default", "gpt2", "gpt-2"):
        return pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    if pre == "smollm":  # SmolLM's tokenizer.json: digits one by one, then GPT-2's split
        return pre_tokenizers.Sequence([
            pre_tokenizers.Digits(individual_digits=True),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
        ])
    splits = {"llama3": _LLAMA3_SPLIT, "llama-v3": _LLAMA3_SPLIT, "llama-bpe": _LLAMA3_SPLIT,
              "smaug-bpe": _LLAMA3_SPLIT, "dbrx": _LLAMA3_SPLIT, "qwen2": _QWEN2_SPLIT}
    if pre not in splits:
        raise ConfigError(f"GGUF tokenizer pre-tokenizer {pre!r} is not supported "
                          f"(supported: default, gpt2, smollm, {', '.join(splits)})")
    return pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(splits[pre]), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's printable spelling of each byte (openai/gpt-2 ``encoder.py``)."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), 256))
    chars = printable[:]
    extra = 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            chars.append(256 + extra)
            extra += 1
    return dict(zip(printable, map(chr, chars)))


def _byte_level(meta: dict[str, Any]) -> tuple[Tokenizer, set[str]]:
    spelling = bytes_to_unicode()
    alphabet = set(spelling.values())
    tokens = meta["tokenizer.ggml.tokens"]
    vocab = {t if set(t) <= alphabet else "".join(spelling[b] for b in t.encode()): i for i, t in enumerate(tokens)}
    merges = [tuple(m.split(" ", 1)) for m in meta.get("tokenizer.ggml.merges", [])]
    tokenizer = Tokenizer(models.BPE(vocab, merges))
    tokenizer.pre_tokenizer = _byte_level_pre_tokenizer(meta.get("tokenizer.ggml.pre"))
    tokenizer.decoder = decoders.ByteLevel()
    return tokenizer, alphabet


def _merges_from_vocab(tokens: list[str], order: dict[str, float]) -> list[tuple[str, str]]:
    """BPE merges implied by a vocabulary without merges: every split of a token into two tokens,
    best ``order`` first (transformers' ``generate_merges``)."""
    vocab = {t: i for i, t in enumerate(tokens)}
    merges = []
    for token, score in order.items():
        local = [(token[:i], token[i:], score) for i in range(1, len(token)) if token[:i] in vocab and token[i:] in vocab]
        merges.extend(sorted(local, key=lambda m: (vocab[m[0]], vocab[m[1]])))
    merges.sort(key=lambda m: (m[2], len(m[0]), len(m[1])), reverse=True)
    return [(left, right) for left, right, _ in merges]


def _sentencepiece(meta: dict[str, Any], arch: str) -> tuple[Tokenizer, None]:
    tokens = list(meta["tokenizer.ggml.tokens"])
    unk_id = meta.get("tokenizer.ggml.unknown_token_id")
    unk = tokens[unk_id] if unk_id is not None else None
    order: dict[str, float]
    if arch == "gemma3":
        # Gemma stores runs of spaces as spaces and lists its merges in vocabulary order, not by score
        tokens = ["\u2581" * len(t) if " " in t and not t.strip() else t for t in tokens]
        order = {t: -i for i, t in enumerate(tokens)}
    else:
        order = dict(zip(tokens, meta["tokenizer.ggml.scores"]))
    if "tokenizer.ggml.merges" in meta:
        merges = [tuple(m.split(" ", 1)) for m in meta["tokenizer.ggml.merges"]]
    else:
        merges = _merges_from_vocab(tokens, order)
    vocab = {t: i for i, t in enumerate(tokens)}
    tokenizer = Tokenizer(models.BPE(vocab, merges, unk_token=unk, fuse_unk=True, byte_fallback=True))
    steps = [decoders.Replace("\u2581", " "), decoders.ByteFallback(), decoders.Fuse()]
    if arch == "gemma3":  # transformers' GemmaTokenizer
        tokenizer.normalizer = normalizers.Replace(" ", "\u2581")
        tokenizer.pre_tokenizer = pre_tokenizers.Split(" ", behavior="merged_with_previous")
    else:  # LlamaTokenizer: a space in front of the text, unless the file says not to
        prefix = bool(meta.get("tokenizer.ggml.add_space_prefix", True))
        tokenizer.pre_tokenizer = pre_tokenizers.Metaspace(prepend_scheme="first" if prefix else "never", split=False)
        if prefix:
            steps.append(decoders.Strip(content=" ", left=1))
    tokenizer.decoder = decoders.Sequence(steps)
    return tokenizer, None


def tokenizer_files(meta: dict[str, Any], source: Path) -> dict[str, Any]:
    """tokenizer.json (a string), tokenizer_config.json and generation_config.json (dicts) for a
    GGUF file's metadata ``meta``; ConfigError naming an unsupported tokenizer type."""
    kind = meta.get("tokenizer.ggml.model")
    if "tokenizer.ggml.tokens" not in meta:
        raise ConfigError(f"{source}: the GGUF file has no tokenizer (tokenizer.ggml.tokens)")
    arch = meta.get("general.architecture", "")
    alphabet: set[str] | None
    if kind == "gpt2":
        tokenizer, alphabet = _byte_level(meta)
    elif kind == "llama":
        tokenizer, alphabet = _sentencepiece(meta, arch)
    else:
        raise ConfigError(f"{source}: GGUF tokenizer type {kind!r} is not supported (supported: gpt2, llama)")

    tokens = meta["tokenizer.ggml.tokens"]
    types = meta.get("tokenizer.ggml.token_type") or [0] * len(tokens)
    tokenizer.add_special_tokens([
        AddedToken(t, special=True, normalized=False) for t, kind_ in zip(tokens, types)
        if kind_ == CONTROL and (alphabet is None or set(t) <= alphabet)
    ])
    vocab = tokenizer.get_vocab()  # a user-defined token respelled in the vocabulary (Gemma's spaces) stays as is
    tokenizer.add_tokens([
        AddedToken(t, special=False, normalized=False) for t, kind_ in zip(tokens, types)
        if kind_ == USER_DEFINED and t in vocab
    ])

    def special(key: str) -> int | None:
        value = meta.get(f"tokenizer.ggml.{key}_token_id")
        return value if isinstance(value, int) and 0 <= value < len(tokens) else None

    bos = special("bos")
    add_bos = bool(meta.get("tokenizer.ggml.add_bos_token", kind == "llama")) and bos is not None
    if add_bos:
        tokenizer.post_processor = processors.TemplateProcessing(
            single=f"{tokens[bos]}:0 $A:0", pair=f"{tokens[bos]}:0 $A:0 $B:1", special_tokens=[(tokens[bos], bos)]
        )
    # generation ends at EOS, and at the end-of-turn / end-of-message tokens a chat model writes
    eos = list(dict.fromkeys(i for i in (special("eos"), special("eot"), special("eom")) if i is not None))
    config: dict[str, Any] = {
        "add_bos_token": add_bos,
        "bos_token": tokens[bos] if bos is not None else None,
        "eos_token": tokens[eos[0]] if eos else None,
    }
    if isinstance(meta.get("tokenizer.chat_template"), str):
        config["chat_template"] = meta["tokenizer.chat_template"]
    return {
        "tokenizer.json": tokenizer.to_str(),
        "tokenizer_config.json": config,
        "generation_config.json": {"bos_token_id": bos, "eos_token_id": eos or None},
    }
