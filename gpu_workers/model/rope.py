"""Rotary position embeddings as transformers computes them for Llama-family models.

Inverse frequencies follow ``transformers.modeling_rope_utils`` (default, linear, dynamic NTK,
llama3) and rotation uses Llama's ``rotate_half`` convention: the head dimension is split into two
halves that rotate as (real, imaginary) pairs.

Dynamic NTK rescales the base from the sequence length seen so far. transformers takes that length
from each forward call; here each token uses the length of its own sequence up to the end of the
current chunk, so a sequence's rotation does not depend on what else is in the batch, and matches
transformers running that sequence alone with the same chunking.
"""

from __future__ import annotations

import math

import torch

from gpu_workers.model import layer_kernels
from gpu_workers.model.config import ModelConfig, RopeScaling


def inv_frequencies(config: ModelConfig, *, device: torch.device | str | None = None,
                    theta: float | None = None, scaling: RopeScaling | None = None) -> torch.Tensor:
    """Inverse frequencies [head_dim / 2] fp32 (dynamic NTK: as within max_position_embeddings), of
    the config's RoPE or of another ``theta`` and ``scaling`` (Gemma 3's sliding-window layers)."""
    dim = config.head_dim
    exponents = torch.arange(0, dim, 2, dtype=torch.int64, device=device).float() / dim
    inv_freq = 1.0 / ((theta or config.rope_theta) ** exponents)
    rope = scaling or config.rope_scaling
    if rope.type == "linear":
        inv_freq = inv_freq / rope.factor
    elif rope.type == "llama3":
        low_wavelen = rope.original_max_position_embeddings / rope.low_freq_factor
        high_wavelen = rope.original_max_position_embeddings / rope.high_freq_factor
        wavelen = 2 * math.pi / inv_freq
        # long waves are slowed down by `factor`, short ones kept, the band between interpolated
        scaled = torch.where(wavelen > low_wavelen, inv_freq / rope.factor, inv_freq)
        smooth = (rope.original_max_position_embeddings / wavelen - rope.low_freq_factor) / (
            rope.high_freq_factor - rope.low_freq_factor
        )
        smoothed = (1 - smooth) * scaled / rope.factor + smooth * scaled
        is_medium = ~(wavelen < high_wavelen) * ~(wavelen > low_wavelen)
        inv_freq = torch.where(is_medium, smoothed, scaled)
    return inv_freq


def dynamic_inv_frequencies(config: ModelConfig, seq_lens: torch.Tensor) -> torch.Tensor:
    """Dynamic-NTK inverse frequencies [T, head_dim / 2] fp32 for tokens whose sequences are
    ``seq_lens`` [T] long (lengths up to max_position_embeddings leave the base unchanged)."""
    dim = config.head_dim
    max_pos = config.max_position_embeddings
    factor = config.rope_scaling.factor
    seq_lens = seq_lens.clamp(min=max_pos)
    base = config.rope_theta * ((factor * seq_lens / max_pos) - (factor - 1)) ** (dim / (dim - 2))  # [T]
    exponents = torch.arange(0, dim, 2, dtype=torch.int64, device=seq_lens.device).float() / dim
    return 1.0 / (base[:, None] ** exponents[None, :])


class RotaryEmbedding(torch.nn.Module):
    """cos/sin tables for a step's positions, computed once and shared by all layers."""

    def __init__(self, config: ModelConfig, *, theta: float | None = None, scaling: RopeScaling | None = None) -> None:
        """The config's RoPE, or one of another ``theta`` and ``scaling`` (never dynamic)."""
        super().__init__()
        self.config = config
        self.dynamic = scaling is None and config.rope_scaling.type == "dynamic"
        self.inv_freq: torch.Tensor
        self.register_buffer("inv_freq", inv_frequencies(config, theta=theta, scaling=scaling), persistent=False)

    def forward(
        self, positions: torch.Tensor, dtype: torch.dtype, seq_lens: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(cos, sin), each [T, 1, head_dim / 2] in ``dtype``, for ``positions`` [T].

        ``seq_lens`` [T] (dynamic NTK only; None when no sequence is past max_position_embeddings)
        is each token's sequence length at the end of its chunk.
        """
        if seq_lens is not None and self.dynamic:
            freqs = positions.float()[:, None] * dynamic_inv_frequencies(self.config, seq_lens)
        else:
            freqs = positions.float()[:, None] * self.inv_freq[None, :]  # [T, D/2]
        return freqs.cos().to(dtype)[:, None, :], freqs.sin().to(dtype)[:, None, :]


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate ``x`` [T, N, D] (any number N of query and key heads) by position, ``cos``, ``sin``
    [T, 1, D / 2] (``RotaryEmbedding``'s); returns a new tensor."""
    if (kernels := layer_kernels.enabled(x, cos, sin)) is not None:
        return kernels.rotary_embedding(x, cos, sin)
    x1, x2 = x.chunk(2, dim=-1)  # [T, N, D/2] each
    return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)
