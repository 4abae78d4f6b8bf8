"""How many bytes the KV cache may take: ``--kv-memory SIZE`` or a share of free memory."""

from __future__ import annotations

import re

from broker.errors import ConfigError

# Without --kv-memory: this share of available host memory on CPU (other groups and the model's
# weights live there too), or of free device memory on CUDA, where the weights are already loaded.
CPU_FREE_SHARE = 0.25
CUDA_FREE_SHARE = 0.85

_UNITS = {
    "": 1, "b": 1,
    "k": 10**3, "kb": 10**3, "m": 10**6, "mb": 10**6, "g": 10**9, "gb": 10**9, "t": 10**12, "tb": 10**12,
    "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40,
}
_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?(?:e\d+)?)\s*([a-z]*)\s*$", re.IGNORECASE)


def parse_size(text: str) -> int:
    """Bytes in ``text``: ``2GiB``, ``512MiB``, ``1.5GB``, ``1e9``, ``4096``."""
    match = _SIZE.match(text)
    unit = match.group(2).lower() if match else ""
    if match is None or unit not in _UNITS:
        raise ConfigError(
            f"--kv-memory {text!r}: expected a size such as 2GiB, 512MiB, 1.5GB or a number of bytes"
        )
    return int(float(match.group(1)) * _UNITS[unit])


def available_host_bytes() -> int:
    """MemAvailable from /proc/meminfo (what the kernel can give without swapping)."""
    try:
        with open("/proc/meminfo", encoding="ascii") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    raise ConfigError("cannot read available memory from /proc/meminfo: pass --kv-memory SIZE")


def kv_budget_bytes(kv_memory: str | None, *, device: str, ranks_on_host: int = 1) -> int:
    """One rank's KV cache bytes: ``--kv-memory`` as given (a per-rank size), else a share of its
    device's free memory, or on CPU of the host's available memory split between the host's ranks."""
    if kv_memory is not None:
        return parse_size(kv_memory)
    if device.startswith("cuda"):
        import torch

        free, _total = torch.cuda.mem_get_info()
        return int(free * CUDA_FREE_SHARE)
    return int(available_host_bytes() * CPU_FREE_SHARE) // ranks_on_host
