"""Each rank reads only its slices of the checkpoint: the bytes it reads are the bytes it holds, and
about half the checkpoint at tp=2 (all but the replicated norms, and a replicated KV head)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from gpu_workers.model.config import load_config
from gpu_workers.model.layers import TPContext
from gpu_workers.model.llama import LlamaForCausalLM
from gpu_workers.model.loader import CheckpointTensor, load_weights
from tests.gpu_workers.reference import save_hf_model


def checkpoint_bytes(path: Path) -> dict[str, torch.Tensor]:
    with safe_open(path / "model.safetensors", framework="pt") as f:
        return {name: f.get_tensor(name) for name in f.keys()}  # noqa: SIM118 - safe_open is no dict


@pytest.mark.parametrize("kv_heads", [2, 1], ids=["kv-split", "kv-replicated"])
def test_a_rank_reads_only_what_it_holds(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, kv_heads: int) -> None:
    path = save_hf_model(tmp_path / "m", family="qwen2", hidden_size=96, num_attention_heads=6,
                         num_key_value_heads=kv_heads, intermediate_size=160)
    full = checkpoint_bytes(path)
    total = sum(t.numel() * t.element_size() for t in full.values())
    reads: list[int] = []
    load = CheckpointTensor.load

    def counting(self: CheckpointTensor) -> torch.Tensor:
        tensor = load(self)
        reads.append(tensor.numel() * tensor.element_size())
        return tensor

    monkeypatch.setattr(CheckpointTensor, "load", counting)
    config = load_config(path)
    held = []
    for rank in range(2):
        reads.clear()
        model = LlamaForCausalLM(config, TPContext(rank=rank, size=2))
        load_weights(model, path)
        holds = sum(p.numel() * p.element_size() for p in model.parameters())
        assert sum(reads) == holds  # every byte read is kept, none read twice
        held.append(holds)
        # and what it keeps is its slice: rows of q/k/v by heads, columns of o_proj, rows of the vocabulary
        attn = model.model.layers[1].self_attn
        q_rows = 3 * 16
        assert torch.equal(attn.qkv_proj.weight[:q_rows], full["model.layers.1.self_attn.q_proj.weight"][rank * q_rows : (rank + 1) * q_rows])
        kv_first = rank * 16 if kv_heads == 2 else 0
        assert torch.equal(attn.qkv_proj.weight[q_rows : q_rows + 16], full["model.layers.1.self_attn.k_proj.weight"][kv_first : kv_first + 16])
        assert torch.equal(attn.o_proj.weight, full["model.layers.1.self_attn.o_proj.weight"][:, rank * 48 : (rank + 1) * 48])
        assert torch.equal(model.lm_head.weight, full["lm_head.weight"][rank * 160 : (rank + 1) * 160])
    norms = sum(t.numel() * t.element_size() for n, t in full.items() if "norm" in n)
    replicated_kv = sum(t.numel() * t.element_size() for n, t in full.items() if ".k_proj." in n or ".v_proj." in n)
    assert sum(held) == total + norms + (replicated_kv if kv_heads == 1 else 0)
    assert held[0] == held[1] < 0.55 * total


def test_phi3_fused_tensors_are_read_by_slices(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Phi-3's fused qkv_proj and gate_up_proj: each rank reads only its heads of q, k and v and its
    rows of gate and up out of the fused tensors, and holds exactly those."""
    path = save_hf_model(tmp_path / "m", family="phi3", hidden_size=96, num_attention_heads=6,
                         num_key_value_heads=2, intermediate_size=160)
    full = checkpoint_bytes(path)
    reads: list[int] = []
    load = CheckpointTensor.load

    def counting(self: CheckpointTensor) -> torch.Tensor:
        tensor = load(self)
        reads.append(tensor.numel() * tensor.element_size())
        return tensor

    monkeypatch.setattr(CheckpointTensor, "load", counting)
    config = load_config(path)
    qkv, gate_up = full["model.layers.1.self_attn.qkv_proj.weight"], full["model.layers.1.mlp.gate_up_proj.weight"]
    for rank in range(2):
        reads.clear()
        model = LlamaForCausalLM(config, TPContext(rank=rank, size=2))
        load_weights(model, path)
        assert sum(reads) == sum(p.numel() * p.element_size() for p in model.parameters())
        layer = model.model.layers[1]
        q, k, v = qkv.split([96, 32, 32])  # 6 query heads, 2 KV heads, head_dim 16
        mine = [q[rank * 48 : (rank + 1) * 48], k[rank * 16 : (rank + 1) * 16], v[rank * 16 : (rank + 1) * 16]]
        assert torch.equal(layer.self_attn.qkv_proj.weight, torch.cat(mine))
        gate, up = gate_up.split([160, 160])
        assert torch.equal(layer.mlp.gate_up_proj.weight, torch.cat([gate[rank * 80 : (rank + 1) * 80],
                                                                     up[rank * 80 : (rank + 1) * 80]]))
