"""Building the project's C kernels (fp8_kernels.c, quant_kernels.c) into shared libraries on first use.

The machine's C compiler (``$CC``, else ``cc``) builds for the CPU it runs on (``-march=native``); the
library is cached under the ryzanstein cache directory, keyed by the source, the flags, the compiler's
version and the CPU's feature flags, so that a cache shared between machines never hands one a
library built for another. A build is written to a temporary file and renamed into place, so racing
builds leave one complete library.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import shutil
import subprocess
import tempfile
from collections.abc import Sequence
from pathlib import Path

from gpu_workers.model.presets import default_cache_dir

BUILD_TIMEOUT_S = 120


def build_library(source: Path, flags: Sequence[str], *, stem: str, libs: Sequence[str] = (),
                  depends: Sequence[Path] = ()) -> Path:
    """The path of ``source`` built with ``flags`` (defines included) and linked with ``libs``, as
    ``<cache>/kernels/<stem>-<key>.so``; built only when no such file exists. ``depends``: files that
    ``source`` includes (part of the key).

    Raises OSError when there is no compiler or it fails (its last 500 characters of stderr), and
    subprocess.SubprocessError when it runs past ``BUILD_TIMEOUT_S``."""
    compiler = os.environ.get("CC") or "cc"
    if shutil.which(compiler) is None:
        raise OSError(f"no C compiler {compiler!r} on PATH")
    version = subprocess.run([compiler, "--version"], capture_output=True, timeout=30, check=True).stdout
    key = hashlib.sha256(b"\0".join([source.read_bytes(), *(d.read_bytes() for d in depends),
                                     " ".join([*flags, *libs]).encode(), version, cpu_flags()]))
    out_dir = default_cache_dir() / "kernels"
    path = out_dir / f"{stem}-{key.hexdigest()[:16]}.so"
    if path.exists():
        return path
    out_dir.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=out_dir)
    os.close(fd)
    try:
        done = subprocess.run([compiler, *flags, "-o", tmp, str(source), *libs], capture_output=True, text=True,
                              check=False, timeout=BUILD_TIMEOUT_S)
        if done.returncode != 0:
            raise OSError(f"{compiler} failed: {done.stderr.strip()[-500:]}")
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return path


def cpu_flags() -> bytes:
    """The ``flags`` line of /proc/cpuinfo (b"" where there is none)."""
    try:
        with open("/proc/cpuinfo", "rb") as f:
            return next((line for line in f if line.startswith(b"flags")), b"")
    except OSError:
        return b""


def function_address(lib: ctypes.CDLL, name: str) -> int:
    """The address of ``lib``'s exported function ``name``, for other C code to call it by (valid while
    ``lib`` stays loaded)."""
    address = ctypes.cast(getattr(lib, name), ctypes.c_void_p).value
    assert address is not None
    return address
