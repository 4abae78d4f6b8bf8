"""Tokenizers and incremental detokenization.

``ByteTokenizer`` maps UTF-8 bytes to ids 0..255 (the echo engine's, and the fallback for models
without a tokenizer.json). ``IncrementalDetokenizer`` turns a growing list of ids into text deltas
that never split a UTF-8 character.
"""

from __future__ import annotations

import os

from gpu_workers.engine import Tokenizer

REPLACEMENT = "\ufffd"


_SYLLABLES = [c + v for c in "bdfgklmnprstvz" for v in "aeiou"]


def _pseudo_word(token_id: int) -> bytes:
    """A made-up ASCII word for an id past the bytes: " kalo", " medu"... (one per id)."""
    k, word = token_id - 256, " "
    while True:
        word += _SYLLABLES[k % len(_SYLLABLES)]
        k //= len(_SYLLABLES)
        if k == 0:
            return word.encode("ascii")


class ByteTokenizer:
    """UTF-8 bytes as token ids 0..255: the echo engine's tokenizer, and the fallback for models
    without a tokenizer.json (random:<preset>). Ids from 256 up decode to made-up words, so that a
    random model's output is visible gibberish rather than nothing. ``specials`` (EOS, BOS) and ids
    outside the vocabulary decode to nothing."""

    def __init__(self, vocab_size: int = 256, *, specials: frozenset[int] = frozenset()) -> None:
        self.vocab_size = vocab_size
        self.specials = specials

    def encode(self, text: str, *, add_special_tokens: bool = True) -> list[int]:
        return list(text.encode("utf-8"))  # bytes: no special tokens either way

    def decode(self, ids: list[int]) -> str:
        out = bytearray()
        for i in ids:
            if 0 <= i < 256:
                out.append(i)
            elif 256 <= i < self.vocab_size and i not in self.specials:
                out += _pseudo_word(i)
        return out.decode("utf-8", errors="replace")


class IncrementalDetokenizer:
    """Text deltas for one sequence of generated ids.

    A token whose bytes end mid-character yields "" and its text arrives with a later token; a
    window of already-decoded ids is kept in front so that tokenizers whose decoding depends on the
    previous token (leading-space handling) produce the same text as a full decode.
    """

    def __init__(self, tokenizer: Tokenizer, context_ids: list[int] | None = None) -> None:
        self._tokenizer = tokenizer
        self._ids = _context_window(tokenizer, list(context_ids or []))
        self._prefix_offset = 0  # start of the window decoded for context
        self._read = len(self._ids)  # ids before this have been emitted as text (or are context)

    def push(self, token_id: int) -> str:
        """Add one generated id; return the text it completes (maybe empty)."""
        self._ids.append(token_id)
        return self._advance(final=False)

    def flush(self) -> str:
        """Whatever is still held back (an incomplete character decodes as U+FFFD)."""
        return self._advance(final=True)

    def _advance(self, *, final: bool) -> str:
        before = self._tokenizer.decode(self._ids[self._prefix_offset : self._read])
        after = self._tokenizer.decode(self._ids[self._prefix_offset :])
        if after.endswith(REPLACEMENT) and not final:
            return ""
        if after.startswith(before):
            # A window text ending in U+FFFD may end mid-character (a context cut inside a real
            # U+FFFD lands here too): the next window keeps its start rather than open there.
            delta = after[len(before) :]
            next_prefix = self._prefix_offset if before.endswith(REPLACEMENT) else self._read
        else:
            # Context ended mid-character: its trailing U+FFFD became the character the generated
            # bytes complete. The window keeps its start, so that it does not open mid-character.
            delta, next_prefix = after[len(os.path.commonprefix([before, after])) :], self._prefix_offset
        if delta or final:
            self._prefix_offset, self._read = next_prefix, len(self._ids)
        return delta


_MAX_CONTEXT_WINDOW = 32


def _context_window(tokenizer: Tokenizer, context: list[int]) -> list[int]:
    """The last context ids, as few as decode to some text that opens on a whole character.

    Some text, because decoders strip the leading space of the first token they see (Llama 2's
    Strip, Metaspace): it must be a context token, not the first generated one. A whole character,
    because a window cut mid-character decodes with a leading U+FFFD, and byte-fallback decoders
    then garble the whole run of byte tokens, the generated ones that join it included.
    """
    start = len(context)
    while start > max(0, len(context) - _MAX_CONTEXT_WINDOW):
        start -= 1
        text = tokenizer.decode(context[start:])
        if text and not text.startswith(REPLACEMENT):
            break
    return context[start:]

