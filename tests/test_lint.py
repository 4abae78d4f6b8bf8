"""The code is ruff-clean (STYLE.md) and mypy-clean, with the ruff and mypy the test extras pin and
pyproject's settings (mypy: strict on broker/, balancer/, the scheduler and the block manager).

mypy works on one core and takes over a minute with a cold cache (a fresh clone): when this test
is selected, tests/conftest.py starts it as soon as the tests are collected (``start_mypy``), beside
the tests before it, which mostly leave the second of two cores idle; the test then waits for its
verdict."""

from __future__ import annotations

import functools
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import IO

ROOT = Path(__file__).resolve().parent.parent
MYPY_TEST = "tests/test_lint.py::test_mypy_finds_nothing"


def test_ruff_finds_nothing() -> None:
    done = subprocess.run([sys.executable, "-m", "ruff", "check", "--no-cache", "."], cwd=ROOT,
                          capture_output=True, text=True, timeout=120, check=False)
    assert done.returncode == 0, done.stdout + done.stderr


@functools.cache
def start_mypy() -> tuple[subprocess.Popen[bytes], IO[bytes]]:
    """``mypy`` (pyproject's settings) running over the tree, and the file its output goes to."""
    # mypy's cache stays in the checkout (.mypy_cache, git-ignored): a second run takes seconds
    out = tempfile.TemporaryFile()  # noqa: SIM115 - outlives this call; stop_mypy closes it
    return subprocess.Popen([sys.executable, "-m", "mypy"], cwd=ROOT, stdout=out, stderr=subprocess.STDOUT), out


def stop_mypy() -> None:
    """Kill mypy if it was started and still runs (the session ended before its test); close its output."""
    if start_mypy.cache_info().currsize:
        proc, out = start_mypy()
        if proc.poll() is None:
            proc.kill()
        proc.wait()
        out.close()


def test_mypy_finds_nothing() -> None:
    proc, out = start_mypy()
    try:
        code = proc.wait(timeout=300)
    except subprocess.TimeoutExpired:
        stop_mypy()
        raise
    out.seek(0)
    assert code == 0, out.read().decode(errors="replace")
