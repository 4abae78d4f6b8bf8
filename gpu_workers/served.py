"""What a group tells clients about the model it serves: the names requests reach it by, and a
fingerprint of its weights.

Several groups may serve one name (replicas, or an old and a new version during an upgrade); the
fingerprint tells versions apart, so that a request moved mid-generation only ever continues on the
weights that began it (see ``WorkerGroup._admit``).
"""

from __future__ import annotations

import hashlib
from pathlib import Path

from broker.errors import ConfigError
from broker.protocol import MODEL_NAME_RE, GenerationRequest

SAMPLES_PER_FILE = 16  # evenly spaced reads per weights file
SAMPLE_BYTES = 1 << 16  # of 64 KiB each: 1 MiB per file, whatever the model's size
WEIGHT_SUFFIXES = (".safetensors", ".gguf")


def default_served_name(spec: str) -> str:
    """The name a group serves ``spec`` under when ``--served-model-name`` is not given: ``echo`` and
    ``random:<preset>`` as written, a hub id (``owner/name``) as written, a directory or file by its
    last component (``/models/SmolLM2-135M/`` -> ``SmolLM2-135M``, ``x.gguf`` -> ``x``), never a
    machine path."""
    if spec == "echo" or spec.startswith("random:"):
        return spec
    path = Path(spec).expanduser()
    if path.exists():
        name = path.resolve().name
        return name.removesuffix(".gguf") if path.is_file() else name
    return spec.strip("/")  # a hub id


def served_model_names(spec: str, names: list[str] | None) -> list[str]:
    """``names`` (``--served-model-name``), checked, else the default name; ConfigError when a name
    cannot be used in a request's ``model`` field."""
    out = list(dict.fromkeys(names or [default_served_name(spec)]))
    for name in out:
        if not MODEL_NAME_RE.fullmatch(name):
            raise ConfigError(f"served model name {name!r}: must be 1-256 characters of [A-Za-z0-9_.:/@+=-]")
    return out


def weights_fingerprint(path: Path | None) -> str:
    """A digest (16 hex digits) of a model directory's config.json and weights; "echo" for none.

    Reads config.json whole and, from each weights file, its size, its first 64 KiB (a safetensors
    header names every tensor, its dtype and shape) and 15 more evenly spaced 64 KiB samples: two
    fine-tunes of one architecture differ there, and a 100 GB checkpoint costs a megabyte per file.
    Copies of the same files on other machines get the same fingerprint.
    """
    if path is None:
        return "echo"
    digest = hashlib.blake2b(digest_size=8)
    files = [path] if path.is_file() else sorted(p for p in path.iterdir() if p.suffix in WEIGHT_SUFFIXES)
    config = path / "config.json" if path.is_dir() else None
    if config is not None and config.is_file():
        digest.update(config.read_bytes())
    if not files:
        raise ConfigError(f"{path}: no weights files ({', '.join(WEIGHT_SUFFIXES)}) to fingerprint")
    for file in files:
        size = file.stat().st_size
        digest.update(f"{file.name}:{size}".encode())
        with file.open("rb") as f:
            for i in range(SAMPLES_PER_FILE):
                f.seek(max(0, size - SAMPLE_BYTES) * i // max(1, SAMPLES_PER_FILE - 1))
                digest.update(f.read(SAMPLE_BYTES))
    return digest.hexdigest()


def foreign_weights(request: GenerationRequest, weights: str) -> str | None:
    """Why a group with ``weights`` must not continue ``request``: its tokens so far came from other
    weights (an older or newer version of the model); None when it may (no tokens yet, or no stamp)."""
    made = len(request.output_ids) + sum(len(ids) for ids in request.choice_output_ids)
    if not made or not request.weights or not weights or request.weights == weights:
        return None
    return (f"{made} tokens of this request came from other weights ({request.weights}) "
            f"than this group's ({weights}) and no group with those weights took it over")
