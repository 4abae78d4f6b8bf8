"""Small real tokenizers, trained here (there is no model hub): the two families Llama-style models use.

* byte-level BPE (GPT-2, Qwen2, Llama 3): ByteLevel pre-tokenizer and decoder, so a character's
  UTF-8 bytes may be spread over several tokens;
* SentencePiece-style BPE (Llama 2, Mistral): "▁" for spaces and byte fallback (``<0xNN>`` tokens)
  for characters outside the vocabulary, decoded by either the Llama 2 decoder chain
  (Replace, ByteFallback, Fuse, Strip) or ByteFallback then Metaspace.

The training text mixes accents, CJK and emoji, and the SentencePiece alphabet is capped so that
rarer characters fall back to bytes.
"""

from __future__ import annotations

import functools
import json

from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, processors, trainers

TEXT = """The quick brown fox jumps over the lazy dog. Ünïcödé àccents: café, naïve, façade, São Paulo, Zürich.
日本語のテキストです。東京は大きな都市です。中文文本测试，你好世界。한국어 텍스트입니다.
Emoji 🦀🎉😀👍🏽 and flags 🇫🇷 and a family 👨‍👩‍👧 amid text. Ελληνικά κείμενα. Русский текст.
    leading spaces and\ttabs\nnew lines\n\nand more   spaces.  Numbers 1234567890 and symbols €£¥ ±×÷.
"""

BYTE_LEVEL_SPECIALS = ["<|endoftext|>", "<|begin_of_text|>", "<|im_start|>", "<|im_end|>"]
SP_SPECIALS = ["<unk>", "<s>", "</s>"]


def _corpus() -> list[str]:
    words = TEXT.split()
    return [TEXT, TEXT.upper(), " ".join(reversed(words))] * 20 + [" ".join(words[i::3]) for i in range(3)]


@functools.cache
def byte_level_json(*, bos_template: bool = False) -> str:
    """GPT-2/Qwen2 style (ByteLevel post-processor); with ``bos_template`` Llama 3 style, whose
    post-processor puts ``<|begin_of_text|>`` in front."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=700, special_tokens=BYTE_LEVEL_SPECIALS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False,
    )
    tok.train_from_iterator(_corpus(), trainer)
    if bos_template:
        bos = "<|begin_of_text|>"
        tok.post_processor = processors.TemplateProcessing(
            single=f"{bos}:0 $A:0", special_tokens=[(bos, tok.token_to_id(bos))]
        )
    else:
        tok.post_processor = processors.ByteLevel(trim_offsets=False)
    return tok.to_str()


@functools.cache
def sentencepiece_json(*, decoder: str = "llama2", bos_template: bool = True) -> str:
    """Llama 2 style: ``<unk> <s> </s>``, then the 256 byte tokens, then the trained pieces.

    ``decoder`` is "llama2" (Replace, ByteFallback, Fuse, Strip) or "metaspace" (ByteFallback,
    Metaspace). With ``bos_template`` the post-processor puts ``<s>`` in front, as Llama 2's and
    Mistral's do; without, there is no post-processor.
    """
    metaspace = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first", split=False)
    draft = Tokenizer(models.BPE(unk_token="<unk>"))
    draft.pre_tokenizer = metaspace
    trainer = trainers.BpeTrainer(vocab_size=450, special_tokens=SP_SPECIALS, limit_alphabet=60, show_progress=False)
    draft.train_from_iterator(_corpus(), trainer)
    trained = json.loads(draft.to_str())["model"]

    vocab = {token: i for i, token in enumerate(SP_SPECIALS)}
    vocab.update({f"<0x{b:02X}>": len(SP_SPECIALS) + b for b in range(256)})
    for token, _ in sorted(trained["vocab"].items(), key=lambda item: item[1]):
        vocab.setdefault(token, len(vocab))
    merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in trained["merges"]]
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, unk_token="<unk>", byte_fallback=True, fuse_unk=True))
    tok.pre_tokenizer = metaspace
    if decoder == "llama2":
        tok.decoder = decoders.Sequence([
            decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(), decoders.Strip(" ", 1, 0),
        ])
    else:
        tok.decoder = decoders.Sequence([
            decoders.ByteFallback(), decoders.Metaspace(replacement="▁", prepend_scheme="first", split=False),
        ])
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in SP_SPECIALS])
    if bos_template:
        tok.post_processor = processors.TemplateProcessing(single="<s>:0 $A:0", special_tokens=[("<s>", 1)])
    return tok.to_str()


def backend(tokenizer_json: str) -> Tokenizer:
    return Tokenizer.from_str(tokenizer_json)
