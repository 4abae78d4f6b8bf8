"""The leader's step broadcast: what followers need to run the same step, as diffs.

Followers keep a mirror of every sequence the leader has scheduled: the token ids they were sent
(a prefix of the sequence's tokens) and its block table. A step message then carries, per chunk,
only what the mirror lacks: the tokens up to the chunk's end that were never sent (a prompt's
tokens go out once, as its chunks are computed; a decode step sends its one new token) and the
blocks appended since the last step (or the whole table when it changed otherwise, after a
preemption). Recomputing a preempted sequence therefore sends no tokens. Sequences the engine has
finished or aborted are named once, so that followers forget them.

Wire format: one flat int64 list, read in order.

    header   KIND, length of the whole message, number of chunks, number of released sequences
    released handles of the sequences to forget
    chunks   per chunk CHUNK_FIELDS ints:
               handle        the leader's number for the sequence (stable while it lives)
               start         tokens of the sequence already in the KV cache
               num_tokens    tokens this chunk computes
               want_logits   bit 0: the chunk ends at the sequence's last token; bit 1: logits
                             of all its tokens (prompt logprobs)
               new_tokens    how many token ids for this sequence follow in the token section
               new_blocks    how many block ids for this sequence follow in the block section
               replace       1: those blocks are its whole table; 0: they extend it
               staging       how many staging block ids follow in the staging section (a staged
                             KV format's, gpu_workers.model.kv_staged: one per KV cache group)
    tokens   the chunks' new token ids, chunk after chunk
    blocks   the chunks' new block ids, chunk after chunk
    staging  the chunks' staging block ids, chunk after chunk

Prompts never appear in logs: followers log nothing per request.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from gpu_workers.model_runner import Chunk

STEP, PING, STOP = 1, 2, 3
HEADER = 4
CHUNK_FIELDS = 8


def control_message(kind: int) -> list[int]:
    """A message with no step: PING (are you there) or STOP (exit now)."""
    return [kind, HEADER, 0, 0]


@dataclass(slots=True)
class _Sent:
    """What followers know of one sequence."""

    handle: int
    tokens: int = 0  # they hold its first ``tokens`` token ids
    table: list[int] = field(default_factory=list)  # its block table as they hold it


class StepEncoder:
    """The leader's side: remembers what followers were sent, and encodes each step as diffs."""

    def __init__(self) -> None:
        self._sent: dict[str, _Sent] = {}
        self._next_handle = 0
        self._released: list[int] = []

    def release(self, request_id: str) -> None:
        """The sequence is gone for good (finished or aborted): the next message tells followers."""
        sent = self._sent.pop(request_id, None)
        if sent is not None:
            self._released.append(sent.handle)

    def encode(self, chunks: list[Chunk]) -> list[int]:
        """The message that lets followers rebuild ``chunks`` (each must carry its ``seq``)."""
        records: list[int] = []
        tokens: list[int] = []
        blocks: list[int] = []
        staging: list[int] = []
        for c in chunks:
            seq = c.seq
            if seq is None:
                raise ValueError("tensor-parallel steps need each chunk's sequence")
            sent = self._sent.get(seq.request_id)
            if sent is None:
                sent = self._sent[seq.request_id] = _Sent(self._next_handle)
                self._next_handle += 1
            end = c.start + len(c.token_ids)
            new_tokens = seq.token_ids[sent.tokens : end] if end > sent.tokens else []
            sent.tokens = max(sent.tokens, end)
            table, known = c.block_table, len(sent.table)
            replace = table[:known] != sent.table
            new_blocks = table if replace else table[known:]
            if replace or new_blocks:
                sent.table = list(table)
            records += [sent.handle, c.start, len(c.token_ids), int(c.want_logits) | int(c.all_logits) << 1,
                        len(new_tokens), len(new_blocks), int(replace), len(c.staging)]
            tokens += new_tokens
            blocks += new_blocks
            staging += c.staging
        released, self._released = self._released, []
        header = [STEP, 0, len(chunks), len(released)]
        message = header + released + records + tokens + blocks + staging
        message[1] = len(message)
        return message


@dataclass(slots=True)
class _Mirror:
    tokens: list[int] = field(default_factory=list)
    table: list[int] = field(default_factory=list)


class StepDecoder:
    """A follower's side: the mirror of every live sequence, and the chunks of each message."""

    def __init__(self) -> None:
        self.seqs: dict[int, _Mirror] = {}

    def decode(self, message: list[int]) -> list[Chunk]:
        kind, length, num_chunks, num_released = message[:HEADER]
        if kind != STEP or length != len(message):
            raise ValueError(f"not a step message (kind {kind}, length {length} of {len(message)})")
        pos = HEADER
        for handle in message[pos : pos + num_released]:
            self.seqs.pop(handle, None)
        pos += num_released
        records = [message[pos + i * CHUNK_FIELDS : pos + (i + 1) * CHUNK_FIELDS] for i in range(num_chunks)]
        tok = pos + num_chunks * CHUNK_FIELDS
        blk = tok + sum(r[4] for r in records)
        stg = blk + sum(r[5] for r in records)
        chunks = []
        for handle, start, num_tokens, want_logits, new_tokens, new_blocks, replace, num_staging in records:
            seq = self.seqs.setdefault(handle, _Mirror())
            seq.tokens += message[tok : tok + new_tokens]
            tok += new_tokens
            if replace:
                seq.table = message[blk : blk + new_blocks]
            else:
                seq.table += message[blk : blk + new_blocks]
            blk += new_blocks
            if len(seq.tokens) < start + num_tokens:
                raise ValueError(f"sequence {handle}: chunk ends at token {start + num_tokens}, {len(seq.tokens)} known")
            chunks.append(Chunk(seq.tokens[start : start + num_tokens], start, seq.table, bool(want_logits & 1),
                                all_logits=bool(want_logits & 2), staging=tuple(message[stg : stg + num_staging])))
            stg += num_staging
        if stg != length:
            raise ValueError(f"step message of {length} ints has {stg} ints of content")
        return chunks
