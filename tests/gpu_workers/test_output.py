"""OutputState: limits, EOS, stop strings, and deltas that always add up to the final text."""

from __future__ import annotations

from collections.abc import Sequence

from hypothesis import example, given, settings
from hypothesis import strategies as st

from broker.protocol import SamplingParams
from gpu_workers.output import OutputState, TokenResult
from gpu_workers.tokenizer import REPLACEMENT, ByteTokenizer

EOS = 256


class WordTokenizer:
    """Each id is a whole string (several characters per token), to test stops across and inside tokens."""

    def __init__(self, words: Sequence[str]) -> None:
        self.words = list(words)

    def encode(self, text: str) -> list[int]:
        raise NotImplementedError

    def decode(self, ids: list[int]) -> str:
        return "".join(self.words[i] for i in ids)


def state(*, max_tokens: int = 100, stop: Sequence[str] = (), prompt: Sequence[int] = (1,),
          max_context: int = 10_000, tokenizer: object | None = None,
          eos: frozenset[int] = frozenset({EOS})) -> OutputState:
    return OutputState(
        sampling=SamplingParams(max_tokens=max_tokens, stop=tuple(stop)),
        prompt_ids=list(prompt),
        tokenizer=tokenizer or ByteTokenizer(vocab_size=257, specials=frozenset({EOS})),  # type: ignore[arg-type]
        eos_token_ids=eos,
        max_context=max_context,
    )


def feed_text(out: OutputState, text: str, *, last_finish: str | None = None) -> list[TokenResult]:
    """Push ``text`` byte by byte until the state finishes; the last byte carries ``last_finish``."""
    ids = list(text.encode())
    results = []
    for n, token in enumerate(ids):
        results.append(out.push(token, engine_finish=last_finish if n == len(ids) - 1 else None))
        if out.finished:
            break
    return results


def joined(results: list[TokenResult]) -> str:
    return "".join(r.text for r in results)


# --- limits and finish reasons --------------------------------------------------------------------


def test_max_tokens_ends_with_length() -> None:
    out = state(max_tokens=3)
    results = feed_text(out, "abcdef")
    assert [r.finish_reason for r in results] == [None, None, "length"]
    assert [r.index for r in results] == [0, 1, 2]
    assert out.finish_reason == "length" and out.text == "abc" and joined(results) == "abc"
    assert out.token_ids == [97, 98, 99]


def test_max_tokens_mid_character_flushes_the_partial_bytes() -> None:
    out = state(max_tokens=2)
    results = feed_text(out, "a€")
    assert out.finish_reason == "length"
    assert out.text == "a" + REPLACEMENT
    assert joined(results) == out.text


def test_eos_token_ends_with_stop_and_adds_no_text() -> None:
    out = state()
    results = [out.push(t) for t in [104, 105, EOS]]
    assert [r.finish_reason for r in results] == [None, None, "stop"]
    assert out.text == "hi" == joined(results)
    assert out.token_ids == [104, 105, EOS]


def test_engine_finish_ends_the_request() -> None:
    out = state()
    results = feed_text(out, "hey", last_finish="stop")
    assert out.finish_reason == "stop" and out.text == "hey" == joined(results)


def test_engine_finish_wins_over_max_tokens_on_the_same_token() -> None:
    out = state(max_tokens=3)
    feed_text(out, "hey", last_finish="stop")
    assert out.finish_reason == "stop"


def test_context_limit_ends_with_length() -> None:
    out = state(prompt=[1, 2, 3], max_context=5, max_tokens=100)
    results = feed_text(out, "abcdef")
    assert len(results) == 2
    assert out.finish_reason == "length" and out.text == "ab"


def test_not_finished_until_a_limit_is_hit() -> None:
    out = state(max_tokens=10)
    feed_text(out, "abc")
    assert not out.finished and out.finish_reason is None


# --- stop strings -----------------------------------------------------------------------------------


def test_stop_string_is_excluded_and_later_text_dropped() -> None:
    out = state(stop=["STOP"])
    results = feed_text(out, "hello STOP world")
    assert out.finish_reason == "stop"
    assert out.text == "hello " == joined(results)
    # it stopped on the token that completed the stop string: nothing after it was generated
    assert len(out.token_ids) == len("hello STOP")


def test_partial_match_is_held_back_until_it_completes() -> None:
    out = state(stop=["END"])
    results = feed_text(out, "ab" + "END")
    assert [r.text for r in results] == ["a", "b", "", "", ""]
    assert [r.finish_reason for r in results] == [None, None, None, None, "stop"]
    assert out.text == "ab"


def test_partial_match_is_released_when_it_turns_out_not_to_be_a_stop() -> None:
    out = state(stop=["END"])
    results = feed_text(out, "xENx")
    assert [r.text for r in results] == ["x", "", "", "ENx"]
    assert out.text == "xENx" == joined(results)
    assert not out.finished


def test_held_back_text_is_released_when_a_limit_ends_the_request() -> None:
    out = state(stop=["END"], max_tokens=3)
    results = feed_text(out, "aEN")
    assert [r.text for r in results] == ["a", "", "EN"]
    assert out.finish_reason == "length" and out.text == "aEN"


def test_overlapping_partial_matches_hold_back_the_longest_tail() -> None:
    out = state(stop=["aab"])
    results = feed_text(out, "aaab")
    # "a", "aa" could start the stop; once "aaa" is seen only the last "aa" can still be a prefix
    assert [r.text for r in results] == ["", "", "a", ""]
    assert out.text == "a" and out.finish_reason == "stop"


def test_earliest_of_several_stop_strings_wins() -> None:
    words = ["x", "--B--A--", "tail"]
    out = state(stop=["A", "B"], tokenizer=WordTokenizer(words), prompt=[0])
    results = [out.push(0), out.push(1)]
    assert out.finish_reason == "stop"
    assert out.text == "x--" == joined(results)


def test_first_completed_stop_ends_even_if_a_longer_one_started_earlier() -> None:
    out = state(stop=["abcd", "bc"])
    results = feed_text(out, "zabcd")
    assert out.text == "za" == joined(results)
    assert len(out.token_ids) == 4


def test_stop_string_spanning_tokens() -> None:
    words = ["Hello", " wo", "rld", "!", " EN", "D", " more"]
    out = state(stop=["END"], tokenizer=WordTokenizer(words), prompt=[0])
    results = [out.push(i) for i in range(1, 6)]
    assert [r.text for r in results] == [" wo", "rld", "!", " ", ""]
    assert out.finish_reason == "stop" and out.text == " world! " == joined(results)


def test_stop_string_inside_one_token() -> None:
    words = ["p", "ab<|end|>cd"]
    out = state(stop=["<|end|>"], tokenizer=WordTokenizer(words), prompt=[0])
    result = out.push(1)
    assert result.finish_reason == "stop" and result.text == "ab" and out.text == "ab"


def test_stop_found_on_the_flushed_tail_at_max_tokens() -> None:
    out = state(stop=["é"], max_tokens=3)
    results = feed_text(out, "aé")
    assert out.finish_reason == "stop" and out.text == "a" == joined(results)


def test_multibyte_stop_string_split_across_byte_tokens() -> None:
    out = state(stop=["🦀"])
    results = feed_text(out, "ok🦀no")
    assert out.text == "ok" == joined(results) and out.finish_reason == "stop"


# --- property: deltas always add up, stops always cut at the first completed match ------------------

ALPHABET = st.characters(blacklist_categories=("Cs",), blacklist_characters=REPLACEMENT)
SMALL = st.sampled_from("abAB é€🦀")


def reference(text: str, stops: Sequence[str], max_tokens: int) -> tuple[str, str, int]:
    """(text, finish_reason, tokens generated) for echo-style byte feeding, computed the slow way."""
    data = text.encode()
    n = min(len(data), max_tokens)
    full = data[:n].decode("utf-8", errors="replace")
    for end in range(1, len(full) + 1):
        starts = [end - len(s) for s in stops if full[:end].endswith(s)]
        if starts:
            # the stop completes with the last byte of character `end` (a flushed tail: byte n)
            used = n if end == len(full) else len(full[:end].encode())
            return full[: min(starts)], "stop", used
    return full, "stop" if n == len(data) else "length", n


@settings(max_examples=300, deadline=None)
@given(
    text=st.one_of(st.text(SMALL, min_size=1, max_size=30), st.text(ALPHABET, min_size=1, max_size=30)),
    stops=st.lists(st.text(SMALL, min_size=1, max_size=4), max_size=3),
    max_tokens=st.integers(min_value=1, max_value=80),
)
@example(text="xxENDyy", stops=["END"], max_tokens=50)
@example(text="abab", stops=["bab", "ab"], max_tokens=50)
def test_deltas_join_to_the_final_text(text: str, stops: list[str], max_tokens: int) -> None:
    out = state(stop=stops, max_tokens=max_tokens)
    results = feed_text(out, text, last_finish="stop")
    assert out.finished
    assert joined(results) == out.text
    assert [r.index for r in results] == list(range(len(results)))
    assert [r.finish_reason for r in results[:-1]] == [None] * (len(results) - 1)
    assert not any(s in out.text for s in stops)
    expected_text, expected_reason, expected_tokens = reference(text, stops, max_tokens)
    assert (out.text, out.finish_reason) == (expected_text, expected_reason)
    assert len(out.token_ids) == expected_tokens
    # a partial stop match is never shown early: every prefix of the deltas is a prefix of the result
    shown = ""
    for r in results:
        shown += r.text
        assert out.text.startswith(shown)


def test_stop_token_ids_end_the_request_like_eos() -> None:
    out = OutputState(
        sampling=SamplingParams(max_tokens=100, stop_token_ids=(ord("!"), ord("?"))),
        prompt_ids=[1],
        tokenizer=ByteTokenizer(vocab_size=257, specials=frozenset({EOS})),
        eos_token_ids=frozenset({EOS}),
        max_context=10_000,
    )
    results = [out.push(t) for t in b"hi?"]
    assert [r.finish_reason for r in results] == [None, None, "stop"]
    assert out.token_ids == list(b"hi?")
    # the stop token's text is left out (vLLM's, without include_stop_str_in_output), in every delta too
    assert out.text == "hi" == "".join(r.text for r in results)
    # EOS still ends a request that has its own stop tokens
    other = state()
    assert other.push(EOS).finish_reason == "stop"


# --- sampling controls that change when a completion ends --------------------------------------------


def controlled_state(**sampling: object) -> OutputState:
    return OutputState(
        sampling=SamplingParams(**sampling),  # type: ignore[arg-type]
        prompt_ids=[1],
        tokenizer=ByteTokenizer(vocab_size=257, specials=frozenset({EOS})),
        eos_token_ids=frozenset({EOS}),
        max_context=10_000,
    )


def test_ignore_eos_goes_on_through_eos_to_max_tokens() -> None:
    out = controlled_state(max_tokens=4, ignore_eos=True)
    results = [out.push(t) for t in (65, EOS, EOS, 66)]
    assert [r.finish_reason for r in results] == [None, None, None, "length"]
    assert out.text == "AB"  # EOS is a special token: no text
    # without it, the first EOS ends the completion
    out = controlled_state(max_tokens=4)
    assert [out.push(t).finish_reason for t in (65, EOS)] == [None, "stop"]


def test_stop_strings_count_only_after_min_tokens() -> None:
    # vLLM's rule: a stop string is looked for once more than min_tokens tokens are generated
    # (a stop string completed before that is not looked for again, as in vLLM)
    for min_tokens, expected in ((0, "a"), (2, "ax"), (4, "axxyy")):
        out = controlled_state(max_tokens=20, min_tokens=min_tokens, stop=("x",))
        results = feed_text(out, "axxyyxz")
        assert out.finish_reason == "stop" and out.text == expected and joined(results) == expected


def test_ignore_eos_leaves_the_requests_own_stop_token_ids() -> None:
    out = controlled_state(max_tokens=8, ignore_eos=True, stop_token_ids=(ord("!"),))
    assert [out.push(t).finish_reason for t in (65, EOS, ord("!"))] == [None, None, "stop"]
