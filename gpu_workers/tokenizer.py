"""Tokenizers and incremental detokenization.

``ByteTokenizer`` maps UTF-8 bytes to ids 0..255 (the echo engine's, and the fallback for models
without a tokenizer.json). ``IncrementalDetokenizer`` turns a growing list of ids into text deltas
that never split a UTF-8 character.
"""

from __future__ import annotations

from gpu_workers.engine import Tokenizer

REPLACEMENT = "\ufffd"


class ByteTokenizer:
    """UTF-8 bytes as token ids; ids at or above 256 (specials of a larger vocab) decode to nothing."""

    def __init__(self, vocab_size: int = 256) -> None:
        self.vocab_size = vocab_size

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def decode(self, ids: list[int]) -> str:
        return bytes(i for i in ids if i < 256).decode("utf-8", errors="replace")


class IncrementalDetokenizer:
    """Text deltas for one sequence of generated ids.

    A token whose bytes end mid-character yields "" and its text arrives with a later token; a
    window of already-decoded ids is kept in front so that tokenizers whose decoding depends on the
    previous token (leading-space handling) produce the same text as a full decode.
    """

    def __init__(self, tokenizer: Tokenizer, context_ids: list[int] | None = None) -> None:
        self._tokenizer = tokenizer
        self._ids: list[int] = list(context_ids or [])[-4:]
        self._prefix_offset = 0  # start of the window decoded for context
        self._read = len(self._ids)  # ids before this have been emitted as text

    def push(self, token_id: int) -> str:
        """Add one generated id; return the text it completes (maybe empty)."""
        self._ids.append(token_id)
        before = self._tokenizer.decode(self._ids[self._prefix_offset : self._read])
        after = self._tokenizer.decode(self._ids[self._prefix_offset :])
        if len(after) > len(before) and not after.endswith(REPLACEMENT):
            self._prefix_offset = self._read
            self._read = len(self._ids)
            return after[len(before) :]
        return ""

    def flush(self) -> str:
        """Whatever is still held back (an incomplete character decodes as U+FFFD)."""
        before = self._tokenizer.decode(self._ids[self._prefix_offset : self._read])
        after = self._tokenizer.decode(self._ids[self._prefix_offset :])
        self._prefix_offset = self._read = len(self._ids)
        return after[len(before) :] if len(after) > len(before) else ""
