"""ByteTokenizer and IncrementalDetokenizer: deltas never split a UTF-8 character."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from gpu_workers.tokenizer import REPLACEMENT, ByteTokenizer, IncrementalDetokenizer

TEXTS = ["", "hello", "héllo wörld", "日本語のテキスト", "emoji 🦀🎉 end", "mixed: a€b😀c\n\t", "👨‍👩‍👧"]


def deltas(ids: list[int], *, context: list[int] | None = None) -> list[str]:
    detok = IncrementalDetokenizer(ByteTokenizer(), context)
    return [detok.push(i) for i in ids] + [detok.flush()]


def test_byte_tokenizer_round_trip() -> None:
    tok = ByteTokenizer()
    for text in TEXTS:
        ids = tok.encode(text)
        assert ids == list(text.encode("utf-8"))
        assert all(0 <= i < 256 for i in ids)
        assert tok.decode(ids) == text


def test_byte_tokenizer_ignores_ids_past_the_bytes() -> None:
    tok = ByteTokenizer(vocab_size=300)
    assert tok.decode([104, 256, 105, 299]) == "hi"


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
    assert "".join(deltas(list(" and more".encode()), context=prompt)) == " and more"


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
