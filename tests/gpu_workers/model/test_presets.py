"""random:<preset> models: written once, atomically, reproducibly, and loaded like any directory."""

from __future__ import annotations

import threading
from pathlib import Path

import pytest
import torch

from broker.errors import ConfigError
from gpu_workers.hf_tokenizer import load_tokenizer
from gpu_workers.model import presets
from gpu_workers.model.loader import resolve_model
from gpu_workers.model.presets import PRESETS, materialize
from gpu_workers.model_runner import Chunk, ModelRunner


def test_written_once_then_reused(tmp_path: Path) -> None:
    path = materialize("tiny", cache_dir=tmp_path)
    weights = path / "model.safetensors"
    stamp = weights.stat().st_mtime_ns, weights.stat().st_ino
    assert materialize("tiny", cache_dir=tmp_path) == path
    assert (weights.stat().st_mtime_ns, weights.stat().st_ino) == stamp
    assert sorted(p.name for p in path.iterdir()) == ["config.json", "generation_config.json", "model.safetensors"]
    assert [p.name for p in path.parent.iterdir()] == [path.name]  # no temporary directory left


@pytest.mark.slow
def test_seeded_bytes_are_identical(tmp_path: Path) -> None:
    a = materialize("tiny", cache_dir=tmp_path / "a")
    b = materialize("tiny", cache_dir=tmp_path / "b")
    c = materialize("tiny", cache_dir=tmp_path / "c", seed=1)
    for name in ("config.json", "generation_config.json", "model.safetensors"):
        assert (a / name).read_bytes() == (b / name).read_bytes()
    assert (a / "model.safetensors").read_bytes() != (c / "model.safetensors").read_bytes()


def test_racing_writers_both_succeed(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    both_written = threading.Barrier(2, timeout=60)
    write = presets._write

    def write_then_wait(*args: object, **kwargs: object) -> None:
        write(*args, **kwargs)
        both_written.wait()  # neither renames before both have written: a real race for the name

    monkeypatch.setattr(presets, "_write", write_then_wait)
    results: list[Path] = []
    threads = [threading.Thread(target=lambda: results.append(materialize("tiny", cache_dir=tmp_path)))
               for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(results) == 2 and results[0] == results[1]
    assert [p.name for p in results[0].parent.iterdir()] == [results[0].name]


def test_unknown_preset_lists_the_valid_ones() -> None:
    with pytest.raises(ConfigError, match="unknown preset random:medium \\(valid: random:tiny, random:small, random:large\\)"):
        materialize("medium")


def test_loaded_through_the_ordinary_path(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("RYZ_CACHE_DIR", str(tmp_path))
    path = resolve_model("random:tiny")
    assert path.parent.parent == tmp_path
    runner = ModelRunner(path, num_blocks=4, block_size=16)
    config = runner.config
    assert config.vocab_size > 255
    assert load_tokenizer(path, vocab_size=config.vocab_size).eos_token_ids == {config.vocab_size - 1}
    assert runner.model.num_weights() == PRESETS["tiny"].num_params()
    assert 15e6 < PRESETS["tiny"].num_params() < 25e6
    assert 150e6 < PRESETS["small"].num_params() < 160e6
    logits = runner.run([Chunk(list(b"hello"), 0, [2], True)])
    assert logits.shape == (1, config.vocab_size) and torch.isfinite(logits).all()
