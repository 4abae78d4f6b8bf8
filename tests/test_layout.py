"""The tree reads as STYLE.md asks: every module of the packages stays within 400 lines and opens
with a comment (its docstring) saying what it owns."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("broker", "balancer", "gpu_workers", "producer", "ryzanstein")
MAX_LINES = 400

MODULES = sorted(p.relative_to(ROOT) for package in PACKAGES for p in (ROOT / package).rglob("*.py"))


def test_the_packages_are_found() -> None:
    assert {m.parts[0] for m in MODULES} == set(PACKAGES)


@pytest.mark.parametrize("module", MODULES, ids=str)
def test_module_is_short_and_says_what_it_owns(module: Path) -> None:
    text = (ROOT / module).read_text()
    lines = len(text.splitlines())
    assert lines <= MAX_LINES, f"{module}: {lines} lines (split it by concern)"
    if text.strip():  # an empty __init__.py owns nothing
        assert ast.get_docstring(ast.parse(text)), f"{module}: no opening docstring saying what it owns"
