"""The code is ruff-clean (STYLE.md), with the ruff the test extras pin and pyproject's settings."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_ruff_finds_nothing() -> None:
    ruff = Path(sys.executable).parent / "ruff"
    ruff_bin = str(ruff) if ruff.exists() else shutil.which("ruff")
    assert ruff_bin, "ruff is not installed: it comes with the test extras (pip install -e '.[test]')"
    done = subprocess.run([ruff_bin, "check", "--no-cache", "."], cwd=ROOT, capture_output=True, text=True,
                          timeout=120, check=False)
    assert done.returncode == 0, done.stdout + done.stderr
