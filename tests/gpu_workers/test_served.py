"""Served model names and weights fingerprints (gpu_workers.served)."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from broker.errors import ConfigError
from gpu_workers.model.presets import materialize
from gpu_workers.served import default_served_name, served_model_names, weights_fingerprint


def test_default_names_are_never_machine_paths(tmp_path: Path) -> None:
    model = tmp_path / "deep" / "SmolLM2-135M"
    model.mkdir(parents=True)
    gguf = tmp_path / "qwen2-0.5b-q8_0.gguf"
    gguf.write_bytes(b"GGUF")
    assert default_served_name(str(model)) == "SmolLM2-135M"
    assert default_served_name(str(model) + "/") == "SmolLM2-135M"
    assert default_served_name(str(gguf)) == "qwen2-0.5b-q8_0"
    assert default_served_name("HuggingFaceTB/SmolLM2-135M") == "HuggingFaceTB/SmolLM2-135M"
    assert default_served_name("random:tiny") == "random:tiny"
    assert default_served_name("echo") == "echo"


def test_relative_directories_are_named_by_their_own_name(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "my-model").mkdir()
    monkeypatch.chdir(tmp_path / "my-model")
    assert default_served_name(".") == "my-model"


def test_served_names_are_checked_and_kept_in_order() -> None:
    assert served_model_names("echo", ["b", "a", "b"]) == ["b", "a"]
    assert served_model_names("random:tiny", None) == ["random:tiny"]
    with pytest.raises(ConfigError, match="served model name 'has space'"):
        served_model_names("echo", ["has space"])


def test_fingerprints_tell_weights_apart_and_copies_alike(tmp_path: Path) -> None:
    tiny = materialize("tiny", cache_dir=tmp_path / "cache")
    other_seed = materialize("tiny", cache_dir=tmp_path / "cache", seed=1)
    copy = tmp_path / "copy"
    shutil.copytree(tiny, copy)
    assert weights_fingerprint(tiny) == weights_fingerprint(copy)
    assert weights_fingerprint(tiny) != weights_fingerprint(other_seed)
    assert len(weights_fingerprint(tiny)) == 16 and weights_fingerprint(None) == "echo"
    # one changed byte in the middle of the weights, where a fine-tune would differ, is seen
    [weights] = sorted(copy.glob("*.safetensors"))
    data = bytearray(weights.read_bytes())
    middle = (len(data) - (1 << 16)) * 8 // 15
    data[middle] ^= 0xFF
    weights.write_bytes(bytes(data))
    assert weights_fingerprint(copy) != weights_fingerprint(tiny)
    with pytest.raises(ConfigError, match="no weights files"):
        weights_fingerprint(tmp_path / "cache")
