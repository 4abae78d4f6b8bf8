"""What attention knows about a step, built once per step (gpu_workers.step_inputs) and read by every
layer: the step's slot mapping, its prefill chunks, its decode groups as their decode backend's
metadata (gpu_workers.model.decode_backends), and the views of sliding-window layers and KV cache
groups.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:
    from gpu_workers.model.decode_backends import DecodeBackend
    from gpu_workers.model.kv_staged import StagedWrites


@dataclass(slots=True)
class PrefillChunk:
    first: int  # index of its first token in the step's flattened tokens
    length: int  # tokens computed now
    start: int  # tokens of this sequence already cached (prefix-cache hits, earlier chunks)
    # [S] cache slots of the keys it attends to (its context, or the part in its window); None: it
    # attends only to its own new tokens (nothing cached before it), read back from their slots
    kv_slots: torch.Tensor | None
    # [length, S] bool (or [length, length] when kv_slots is None), True where a key is visible;
    # None: plain causal attention over its own tokens. A staged cache (gpu_workers.model.kv_staged):
    # [length, 2S], the keys read back as stored, then the same keys as its own block holds them (bf16)
    mask: torch.Tensor | None
    # A staged cache only: dense slots [m] of the tokens of its first query's block cached before it
    # (staged), keys [dense_from, dense_from + m) of the context
    dense_slots: torch.Tensor | None = None
    dense_from: int = 0


@dataclass(slots=True)
class DecodeMetadata:
    """One decode group, as its backend reads it (each backend's metadata adds its own fields)."""

    first: int  # index of its first token (= sequence) among the step's tokens
    count: int  # sequences in the group, one token each


@dataclass(slots=True)
class AttentionBatch:
    """One view of a step: its tokens' cache slots, how its decodes read the cache, its chunks."""

    slot_mapping: torch.Tensor  # [T] cache slot of every new token
    decode_backend: DecodeBackend[Any]  # reads this view's decode groups (and prefill contexts)
    num_decode: int = 0  # tokens [0, num_decode) are decode tokens, one per sequence
    decode_groups: list[DecodeMetadata] = field(default_factory=list)  # covering [0, num_decode) in order
    prefills: list[PrefillChunk] = field(default_factory=list)
    # Dynamic NTK RoPE only: each token's sequence length at the end of its chunk, when some
    # sequence is past max_position_embeddings (None otherwise).
    rope_seq_lens: torch.Tensor | None = None
    # Sliding-window layers' views of this step, by window: the same tokens and slot mapping, with
    # decode groups and prefill chunks that read only the window; the step itself when the window
    # holds every sequence's whole context.
    windowed: dict[int, AttentionBatch] = field(default_factory=dict)
    # Every KV cache group's view of this step, by group (this batch is group 0's); empty: one group.
    groups: list[AttentionBatch] = field(default_factory=list)
    # A staged cache's writes (gpu_workers.model.kv_staged), in place of ``slot_mapping``; None: other caches.
    staged: StagedWrites | None = None
