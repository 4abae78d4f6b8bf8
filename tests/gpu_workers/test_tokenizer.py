"""ByteTokenizer and IncrementalDetokenizer: deltas never split a UTF-8 character.

The detokenizer is checked on real tokenizers too (tests/gpu_workers/tokenizer_fixtures.py): a
byte-level BPE and SentencePiece-style BPEs with byte fallback, whose decoders differ in how a
character's bytes are spread over tokens and in how the leading space is stripped.
"""

from __future__ import annotations

import functools

import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from gpu_workers.engine import Tokenizer
from gpu_workers.hf_tokenizer import HFTokenizer
from gpu_workers.tokenizer import REPLACEMENT, ByteTokenizer, IncrementalDetokenizer
from tests.gpu_workers import tokenizer_fixtures as fixtures

TEXTS = ["", "hello", "héllo wörld", "日本語のテキスト", "emoji 🦀🎉 end", "mixed: a€b😀c\n\t", "👨‍👩‍👧"]


def deltas(ids: list[int], *, context: list[int] | None = None, tokenizer: Tokenizer | None = None) -> list[str]:
    """What the detokenizer returns for each id pushed, then its flush."""
    detok = IncrementalDetokenizer(tokenizer or ByteTokenizer(), context)
    return [detok.push(i) for i in ids] + [detok.flush()]


def test_byte_tokenizer_round_trip() -> None:
    tok = ByteTokenizer()
    for text in TEXTS:
        ids = tok.encode(text)
        assert ids == list(text.encode("utf-8"))
        assert all(0 <= i < 256 for i in ids)
        assert tok.decode(ids) == text


def test_byte_tokenizer_shows_ids_past_the_bytes_as_distinct_made_up_words() -> None:
    tok = ByteTokenizer(vocab_size=32000)
    words = [tok.decode([i]) for i in range(256, 32000)]
    assert len(set(words)) == len(words)
    assert all(w.startswith(" ") and w[1:].isascii() and w[1:].isalpha() for w in words)
    assert tok.decode([104, 256, 105, 257]) == "h" + words[0] + "i" + words[1]
    assert tok.decode([104, 32000, -1, 105]) == "hi"  # outside the vocabulary: nothing


def test_byte_tokenizer_decodes_broken_utf8_with_replacement() -> None:
    assert ByteTokenizer().decode([0x61, 0xE2, 0x82]) == "a" + REPLACEMENT


def test_multibyte_characters_arrive_whole_with_their_last_byte() -> None:
    # "€" is 3 bytes, "😀" 4: nothing shows until the character is complete.
    out = deltas(list("a€😀".encode()))
    assert out == ["a", "", "", "€", "", "", "", "😀", ""]


def test_no_delta_ever_holds_a_partial_character() -> None:
    for text in TEXTS:
        for piece in deltas(list(text.encode())):
            assert REPLACEMENT not in piece
            piece.encode("utf-8")  # a lone surrogate or split character would fail here


def test_flush_returns_an_incomplete_tail_as_replacement() -> None:
    ids = list("ok😀".encode())[:-2]  # "ok" + the first 2 of 4 bytes
    out = deltas(ids)
    assert "".join(out[:-1]) == "ok"
    assert out[-1] == REPLACEMENT
    assert "".join(out) == ByteTokenizer().decode(ids)


def test_flush_of_nothing_held_is_empty_and_idempotent() -> None:
    detok = IncrementalDetokenizer(ByteTokenizer())
    assert detok.push(ord("x")) == "x"
    assert detok.flush() == ""
    assert detok.flush() == ""
    assert detok.push(ord("y")) == "y"


def test_prompt_context_is_not_repeated_in_deltas() -> None:
    prompt = list("the prompt ünïcode".encode())
    assert "".join(deltas(list(b" and more"), context=prompt)) == " and more"


@given(st.binary(max_size=64))
def test_joined_deltas_equal_full_decode_for_any_bytes(data: bytes) -> None:
    ids = list(data)
    out = deltas(ids)
    assert "".join(out) == ByteTokenizer().decode(ids)


@given(st.text(alphabet=st.characters(blacklist_categories=("Cs",), blacklist_characters=REPLACEMENT)),
       st.integers(min_value=0, max_value=64))
def test_truncated_byte_streams_decode_like_a_full_decode(text: str, cut: int) -> None:
    ids = list(text.encode())[:cut]
    out = deltas(ids)
    assert "".join(out) == ByteTokenizer().decode(ids)
    # everything but the flush is whole characters of the text
    assert text.startswith("".join(out[:-1]))


# --- real tokenizers -----------------------------------------------------------------------------

TOKENIZERS = {
    "byte-level": lambda: fixtures.byte_level_json(),
    "byte-level+bos": lambda: fixtures.byte_level_json(bos_template=True),
    "sentencepiece": lambda: fixtures.sentencepiece_json(),
    "sentencepiece-metaspace": lambda: fixtures.sentencepiece_json(decoder="metaspace", bos_template=False),
}
BYTE_LEVEL = ("byte-level", "byte-level+bos")


@functools.cache
def real(name: str) -> HFTokenizer:
    return HFTokenizer(fixtures.backend(TOKENIZERS[name]()))


# Characters that stress detokenization: multi-byte (accents, CJK, emoji with joiners, modifiers and
# flags), combining marks, runs of spaces, newlines and tabs, U+FFFD itself, special-token text.
TRICKY = [*" \n\t\r\u00a0éü日本語中文한🦀🎉😀👍🏽🇫🇷👨👩\u200d\ufe0f\u0301\u0308€▁.a", REPLACEMENT,
          "  ", "   ", "\n\n", "<s>", "</s>", "<|im_end|>", "<unk>", "\U0001d518"]
texts = st.lists(st.one_of(st.sampled_from(TRICKY), st.characters(blacklist_categories=("Cs",))), max_size=40).map(
    "".join
)
names = st.sampled_from(sorted(TOKENIZERS))


@settings(max_examples=300, deadline=None)
@given(names, texts)
def test_real_tokenizers_joined_deltas_equal_the_full_decode(name: str, text: str) -> None:
    tok = real(name)
    ids = tok.encode(text)
    out = deltas(ids, tokenizer=tok)
    full = tok.decode(ids)
    assert "".join(out) == full
    if REPLACEMENT not in full:
        assert not any(REPLACEMENT in piece for piece in out)


@settings(max_examples=300, deadline=None)
@given(names, texts, texts)
def test_real_tokenizers_deltas_after_a_prompt_are_the_text_it_adds(name: str, prompt: str, text: str) -> None:
    tok = real(name)
    context = tok.encode(prompt)
    ids = tok.encode(text)[1 if name == "byte-level+bos" else 0 :]  # one BOS, in front of the prompt
    whole, before = tok.decode(context + ids), tok.decode(context)
    assert whole.startswith(before)
    assert "".join(deltas(ids, context=context, tokenizer=tok)) == whole[len(before) :]


@settings(max_examples=300, deadline=None)
@given(names, texts, st.integers(min_value=0, max_value=200))
# a cut inside a real U+FFFD (byte-fallback tokens): the window must not reopen mid-character
@example("sentencepiece-metaspace", f"0 0 日🦀 {REPLACEMENT}<|im_end|>", 14)
@example("sentencepiece", f"0 0 日🦀 {REPLACEMENT}<|im_end|>", 15)
def test_real_tokenizers_resume_after_any_cut(name: str, text: str, cut: int) -> None:
    """Ids already generated elsewhere as context, the rest pushed: what a migrated request sees.

    Cut at a character boundary, the deltas are the rest of the text. Cut mid-character, a
    byte-level decoder shows the split character as U+FFFD in the context alone, and the deltas
    start with the whole character.
    """
    tok = real(name)
    ids = tok.encode(text)
    context, rest = ids[:cut], ids[cut:]
    whole, before = tok.decode(ids), tok.decode(context)
    out = "".join(deltas(rest, context=context, tokenizer=tok))
    if whole.startswith(before):
        assert out == whole[len(before) :]
    elif name in BYTE_LEVEL:
        kept = before.rstrip(REPLACEMENT)
        assert whole.startswith(kept)
        assert out == whole[len(kept) :]


@pytest.mark.parametrize("name", sorted(TOKENIZERS))
def test_characters_spread_over_several_tokens_arrive_whole(name: str) -> None:
    tok = real(name)
    text = "ẞ𝔘 日本語🦀👨\u200d👩\u200d👧 e\u0301 ok"
    ids = tok.encode(text)
    out = deltas(ids, tokenizer=tok)
    assert "".join(out) == tok.decode(ids)
    assert sum(piece == "" for piece in out[:-1]) >= 3  # some tokens carried only part of a character
    for piece in out:
        assert REPLACEMENT not in piece


def test_a_context_window_cut_inside_a_byte_fallback_run_does_not_garble_the_next_bytes() -> None:
    # "日" is three <0xNN> tokens here; ByteFallback decodes a run of byte tokens all or nothing,
    # so a window that opened on "日"'s second byte would turn the tab's byte into U+FFFD too.
    tok = real("sentencepiece")
    context = tok.encode("ü日")
    assert len(context) >= 5
    ids = [tok.token_to_id("<0x09>")]
    assert "".join(deltas(ids, context=context, tokenizer=tok)) == "\t"


def test_a_space_after_context_that_decodes_to_nothing_alone_is_kept() -> None:
    # The context window must reach back to some text: one holding only "<s>" decodes to "", and
    # Llama 2's Strip would then eat the space that starts the first generated token.
    tok = real("sentencepiece")
    context = tok.encode("🦀") + [tok.token_to_id("<s>")]
    ids = tok.encode(" x")[1:]
    whole, before = tok.decode(context + ids), tok.decode(context)
    assert whole == "🦀 x" and before == "🦀"
    assert "".join(deltas(ids, context=context, tokenizer=tok)) == " x"


def test_context_ending_mid_character_yields_the_whole_character() -> None:
    tok = real("byte-level")
    ids = tok.encode("ab😀")
    for cut in range(len(ids)):
        context, rest = ids[:cut], ids[cut:]
        if tok.decode(context).endswith(REPLACEMENT):
            assert "".join(deltas(rest, context=context, tokenizer=tok)) == "😀"
            break
    else:
        pytest.fail("no cut inside 😀: the fixture no longer splits it over tokens")
