"""KV cache groups (vLLM's hybrid KV cache manager): which model layers share a KV block.

The model's layers are split into ``G`` groups of equally many layers, each group of one attention
kind (full, or one sliding window), and a block holds the K/V of one group's layers. Each group has
its own blocks (gpu_workers.block_manager hands them out, the block tables interleave them), so a
sliding group can give back the blocks before its window while full-attention groups keep theirs.
Gemma 3 270M (15 sliding-window layers of 512 tokens, 3 global) has six groups of three layers: one
global, five sliding, and at long contexts a sequence holds about a sixth of the blocks the global
group does per sliding group (``KVCacheGroups.peak_blocks``). Plain Python, no torch.
"""

from __future__ import annotations

import math
from collections.abc import Sequence as Tokens
from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class KVCacheGroups:
    """Which model layers share a KV block: ``layers[k]`` are group ``k``'s layers (equally many in
    every group), ``windows[k]`` its sliding window in tokens (None: full attention, keeps all).

    ``of(layer_windows)`` splits layers by kind into groups of ``gcd`` (count of each kind) layers;
    ``single(layer_windows)`` is one group of every layer (every block holds every layer: what a
    model runner used alone assumes), sliding only when all layers share one window.
    """

    windows: tuple[int | None, ...]
    layers: tuple[tuple[int, ...], ...]

    def __post_init__(self) -> None:
        sizes = {len(g) for g in self.layers}
        if len(self.windows) != len(self.layers) or len(sizes) != 1 or 0 in sizes:
            raise ValueError(f"KV cache groups need equally many layers each, got {self.layers}")
        if len({w for w in self.windows if w is not None}) > 1:
            raise ValueError(f"KV cache groups slide over one window at most, got {self.windows}")

    @classmethod
    def single(cls, layer_windows: Tokens[int | None]) -> KVCacheGroups:
        windows = set(layer_windows)
        window = windows.pop() if len(windows) == 1 else None
        return cls((window,), (tuple(range(len(layer_windows))),))

    @classmethod
    def of(cls, layer_windows: Tokens[int | None]) -> KVCacheGroups:
        kinds: dict[int | None, list[int]] = {}
        for layer, window in enumerate(layer_windows):
            kinds.setdefault(window, []).append(layer)
        size = math.gcd(*(len(layers) for layers in kinds.values()))
        windows, groups = [], []
        for window in sorted(kinds, key=lambda w: -1 if w is None else w):  # full attention first
            layers = kinds[window]
            for i in range(0, len(layers), size):
                windows.append(window)
                groups.append(tuple(layers[i : i + size]))
        return cls(tuple(windows), tuple(groups))

    @property
    def num_groups(self) -> int:
        return len(self.layers)

    @property
    def layers_per_block(self) -> int:
        return len(self.layers[0])

    @property
    def sliding_window(self) -> int | None:
        return next((w for w in self.windows if w is not None), None)

    def locate(self, layer: int) -> tuple[int, int]:
        """(group, index of the layer within its group's blocks) of model layer ``layer``."""
        for k, layers in enumerate(self.layers):
            if layer in layers:
                return k, layers.index(layer)
        raise ValueError(f"layer {layer} is in no KV cache group")

    def window_blocks(self, chunk: int, block_size: int) -> int:
        """Blocks a sliding group holds at most while a step computes ``chunk`` tokens: those of the
        keys the chunk's first query sees (``W - 1`` before it) up to its last token."""
        window = self.sliding_window
        assert window is not None
        return (window + chunk - 2) // block_size + 2

    def peak_blocks(self, num_tokens: int, block_size: int, *, chunk: int = 1) -> int:
        """Blocks one sequence of ``num_tokens`` tokens holds at most, computed ``chunk`` tokens per
        step (after its first chunk): every group holds every block but a sliding group its
        window's (``window_blocks``)."""
        n = -(-num_tokens // block_size)
        return sum(n if w is None else min(n, self.window_blocks(chunk, block_size)) for w in self.windows)


FULL_ATTENTION = KVCacheGroups((None,), ((0,),))  # a layout of one full-attention group
