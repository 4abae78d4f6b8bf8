"""load_weights and resolve_model: lazy shard reads, and errors that name what is wrong."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from broker.errors import ConfigError
from gpu_workers.model.config import load_config
from gpu_workers.model.layers import TPContext
from gpu_workers.model.llama import LlamaForCausalLM
from gpu_workers.model.loader import CheckpointTensor, load_weights, resolve_model
from tests.gpu_workers.model.hf_models import build, save

ROOT = Path(__file__).resolve().parents[3]


@pytest.fixture
def checkpoint(tmp_path: Path) -> Path:
    return save(build("llama-gqa"), tmp_path / "model")


def _edit(path: Path, change: Callable[[dict[str, torch.Tensor]], object]) -> None:
    tensors = load_file(path / "model.safetensors")
    change(tensors)
    save_file(tensors, path / "model.safetensors", metadata={"format": "pt"})


def _load(path: Path, tp: TPContext | None = None) -> LlamaForCausalLM:
    model = LlamaForCausalLM(load_config(path), tp)
    load_weights(model, path)
    return model


def test_loads_every_parameter_from_its_checkpoint_tensors(checkpoint: Path) -> None:
    model = _load(checkpoint)
    full = load_file(checkpoint / "model.safetensors")
    attn = model.model.layers[1].self_attn.qkv_proj.weight
    expected = torch.cat([full[f"model.layers.1.self_attn.{p}_proj.weight"] for p in "qkv"])
    assert torch.equal(attn, expected)
    gate_up = model.model.layers[0].mlp.gate_up_proj.weight
    assert torch.equal(gate_up, torch.cat([full["model.layers.0.mlp.gate_proj.weight"], full["model.layers.0.mlp.up_proj.weight"]]))
    assert torch.equal(model.lm_head.weight, full["lm_head.weight"])


def test_each_rank_reads_its_shard(checkpoint: Path) -> None:
    full = load_file(checkpoint / "model.safetensors")
    ranks = [_load(checkpoint, TPContext(rank=r, size=2)) for r in range(2)]
    down = torch.cat([m.model.layers[0].mlp.down_proj.weight for m in ranks], dim=1)
    assert torch.equal(down, full["model.layers.0.mlp.down_proj.weight"])
    q = torch.cat([m.model.layers[0].self_attn.qkv_proj.weight[:32] for m in ranks])  # 2 q heads of 16 each
    assert torch.equal(q, full["model.layers.0.self_attn.q_proj.weight"])


def test_checkpoint_tensor_narrow_reads_only_that_part(checkpoint: Path) -> None:
    with safe_open(checkpoint / "model.safetensors", framework="pt") as f:
        name = "model.layers.0.mlp.down_proj.weight"
        whole = f.get_tensor(name)
        lazy = CheckpointTensor(f.get_slice(name), tuple(f.get_slice(name).get_shape()))
        part = lazy.narrow(1, 32, 48).narrow(0, 10, 5)
        assert part.shape == (5, 48)
        assert torch.equal(part.load(), whole[10:15, 32:80])
        with pytest.raises(ValueError):
            lazy.narrow(0, 60, 5)


def test_missing_and_unexpected_tensors_are_named(checkpoint: Path) -> None:
    _edit(checkpoint, lambda t: t.pop("model.layers.1.self_attn.k_proj.weight"))
    with pytest.raises(ConfigError, match=r"missing tensors: model\.layers\.1\.self_attn\.k_proj\.weight$"):
        _load(checkpoint)
    _edit(checkpoint, lambda t: t.update({
        "model.layers.1.self_attn.k_proj.weight": torch.zeros(32, 64),
        "model.layers.0.mlp.extra.weight": torch.zeros(2),
        "model.layers.0.self_attn.rotary_emb.inv_freq": torch.zeros(8),  # a recomputed buffer: ignored
    }))
    with pytest.raises(ConfigError, match=r"unexpected tensors: model\.layers\.0\.mlp\.extra\.weight$"):
        _load(checkpoint)


def test_wrong_shape_is_named(checkpoint: Path) -> None:
    _edit(checkpoint, lambda t: t.update({"model.layers.0.mlp.up_proj.weight": torch.zeros(95, 64)}))
    with pytest.raises(ConfigError, match=r"model\.layers\.0\.mlp\.up_proj\.weight: checkpoint shape \(95, 64\)"):
        _load(checkpoint)


def test_no_weights_at_all(tmp_path: Path, checkpoint: Path) -> None:
    (checkpoint / "model.safetensors").unlink()
    with pytest.raises(ConfigError, match="no model.safetensors or model.safetensors.index.json"):
        _load(checkpoint)


def test_resolve_model_local_dir_and_bad_specs(checkpoint: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    assert resolve_model(str(checkpoint)) == checkpoint
    with pytest.raises(ConfigError, match="no such directory, and not random:<preset> or a hub id"):
        resolve_model("/no/such/dir/")
    with pytest.raises(ConfigError, match="random:tiny, random:small, random:large"):
        resolve_model("random:huge")
    monkeypatch.setitem(sys.modules, "huggingface_hub", None)  # import fails
    with pytest.raises(ConfigError, match="huggingface_hub is not installed"):
        resolve_model("someone/some-model")


def test_resolve_model_offline_error_is_clear(tmp_path: Path) -> None:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path)}
    code = (
        "from gpu_workers.model.loader import resolve_model\n"
        "from broker.errors import ConfigError\n"
        "try:\n    resolve_model('someone/some-model')\n"
        "except ConfigError as e:\n    print(e)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], env=env, cwd=ROOT, capture_output=True, text=True, timeout=60,
                         check=False)
    assert out.returncode == 0, out.stderr
    assert "model 'someone/some-model': no such directory" in out.stdout
    assert "offline (HF_HUB_OFFLINE is set) and not in the local Hugging Face cache" in out.stdout


def test_a_hub_download_fetches_every_file_the_tokenizer_and_template_need() -> None:
    from huggingface_hub.utils import filter_repo_objects

    from gpu_workers.model.loader import HUB_FILES

    needed = ["config.json", "generation_config.json", "model-00001-of-00002.safetensors",
              "model.safetensors.index.json", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
              "chat_template.jinja", "additional_chat_templates/tool_use.jinja", "tokenizer.model",
              "merges.txt", "vocab.txt", "qwen.tiktoken"]
    unneeded = ["pytorch_model.bin", "model.gguf", "onnx/model.onnx", "flax_model.msgpack", "README.md",
                "original/consolidated.00.pth", "LICENSE"]
    assert list(filter_repo_objects(needed + unneeded, allow_patterns=list(HUB_FILES))) == needed
