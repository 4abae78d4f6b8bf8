"""``worker --tp K`` refuses what cannot form a group before starting any rank process."""

from __future__ import annotations

from pathlib import Path

import pytest

from ryzanstein.cli import main
from tests.gpu_workers.reference import save_hf_model


def worker(redis_url: str, *args: str) -> int:
    return main(["worker", "--redis-url", redis_url, "--log-level", "ERROR", "--wait-broker", "0", *args])


def test_refused_before_any_rank_starts(tmp_path: Path, redis_url: str, capsys: pytest.CaptureFixture[str],
                                        monkeypatch: pytest.MonkeyPatch) -> None:
    uneven = save_hf_model(tmp_path / "m", family="llama", hidden_size=96, num_attention_heads=6,
                           num_key_value_heads=3)
    spawned: list[object] = []
    monkeypatch.setattr("subprocess.Popen", lambda *a, **k: spawned.append(a) or pytest.fail("a rank started"))

    assert worker(redis_url, "--model", str(uneven), "--tp", "2") == 2
    assert "tensor parallel size 2 and 3 KV heads: one must divide the other" in capsys.readouterr().err
    assert worker(redis_url, "--model", str(uneven), "--tp", "4") == 2
    assert "does not divide 6 attention heads" in capsys.readouterr().err
    assert worker(redis_url, "--model", "echo", "--tp", "2") == 2
    assert "--model echo runs on one process" in capsys.readouterr().err

    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "4")
    assert worker(redis_url, "--model", str(uneven), "--tp", "2") == 2
    assert "--tp 2 but WORLD_SIZE is 4" in capsys.readouterr().err
    assert spawned == []
