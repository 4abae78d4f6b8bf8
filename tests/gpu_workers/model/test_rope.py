"""RoPE frequencies and rotation against transformers' own functions."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from gpu_workers.model.config import load_config
from gpu_workers.model.rope import RotaryEmbedding, apply_rotary, dynamic_inv_frequencies, inv_frequencies
from tests.gpu_workers.model.hf_models import BASE, CONFIGS


@pytest.mark.parametrize("name", ["llama-gqa", "llama-bias-headdim-linear", "llama-llama3", "llama-dynamic"])
def test_frequencies_and_rotation_match_transformers(tmp_path: Path, name: str) -> None:
    import transformers
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding, apply_rotary_pos_emb

    family, overrides = CONFIGS[name]
    hf_config = getattr(transformers, f"{family}Config")(**{**BASE, **overrides})
    hf_config.save_pretrained(tmp_path)
    config = load_config(tmp_path)
    hf_rope = LlamaRotaryEmbedding(hf_config)
    assert torch.equal(inv_frequencies(config), hf_rope.inv_freq)

    positions = torch.arange(0, 40)
    x = torch.randn(1, 3, 40, config.head_dim)  # [B, H, T, D] as transformers has it
    cos_hf, sin_hf = hf_rope(x, positions[None])
    ref, _ = apply_rotary_pos_emb(x, x, cos_hf, sin_hf)
    cos, sin = RotaryEmbedding(config)(positions, torch.float32)
    ours = apply_rotary(x[0].transpose(0, 1), cos, sin)  # [T, H, D]
    assert torch.allclose(ours, ref[0].transpose(0, 1), atol=1e-6)


def test_dynamic_ntk_grows_the_base_past_max_positions(tmp_path: Path) -> None:
    import transformers
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    hf_config = transformers.LlamaConfig(**{**BASE, **CONFIGS["llama-dynamic"][1]})
    hf_config.save_pretrained(tmp_path)
    config = load_config(tmp_path)
    lens = torch.tensor([10, 48, 60, 100])
    ours = dynamic_inv_frequencies(config, lens)
    for row, n in zip(ours, lens.tolist()):
        ref, _ = ROPE_INIT_FUNCTIONS["dynamic"](hf_config, None, seq_len=torch.tensor(n))
        assert torch.allclose(row, ref, rtol=1e-6)
    assert torch.equal(ours[0], inv_frequencies(config)) and torch.equal(ours[1], ours[0])
    # longer sequences: larger base, lower frequencies (the first is always 1)
    assert (ours[3, 1:] < ours[2, 1:]).all() and (ours[2, 1:] < ours[1, 1:]).all()
