"""How many bytes the KV cache may take: ``--kv-memory SIZE`` or a share of free memory.

On a CPU, "free" is the smaller of the host's MemAvailable and what the process' memory cgroup still
allows (its limit less its usage, the tightest over its ancestors): in a container or a Kubernetes
pod with an 8 GiB limit on a 256 GiB node, the host's figure would get the process OOM-killed. Both
cgroup versions are read: v2 ``memory.max``/``memory.current`` and v1
``memory.limit_in_bytes``/``memory.usage_in_bytes``.
"""

from __future__ import annotations

import logging
import re
from pathlib import Path

from broker.errors import ConfigError

log = logging.getLogger(__name__)

CGROUP_ROOT = Path("/sys/fs/cgroup")
SELF_CGROUP = Path("/proc/self/cgroup")
# cgroup v1 writes "no limit" as the largest page-aligned long (9223372036854771712)
_V1_UNLIMITED = 1 << 60

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


def available_host_bytes(meminfo: Path = Path("/proc/meminfo")) -> int:
    """MemAvailable from /proc/meminfo (what the kernel can give without swapping)."""
    try:
        with open(meminfo, encoding="ascii") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    raise ConfigError("cannot read available memory from /proc/meminfo: pass --kv-memory SIZE")


def _read_int(path: Path) -> int | None:
    try:
        text = path.read_text().strip()
    except OSError:
        return None
    return int(text) if text.isdigit() else None  # "max" (v2 without a limit), or unreadable


def cgroup_dirs(root: Path, relative: str) -> list[Path]:
    """``root/relative`` and its ancestors up to ``root``, those that exist, innermost first. Inside
    a container's cgroup namespace the path is ``/`` and ``root`` itself is the container's cgroup."""
    here = root / relative.strip("/")
    chain = [here, *here.parents] if relative.strip("/") else [root]
    return [p for p in chain if p.is_dir() and (p == root or root in p.parents)]


def cgroup_room_bytes(*, root: Path = CGROUP_ROOT, self_cgroup: Path = SELF_CGROUP) -> int | None:
    """Bytes this process' memory cgroup can still take: limit less usage, the smallest over the
    cgroup and its ancestors; None where no memory limit applies (or cgroups are not mounted)."""
    try:
        lines = self_cgroup.read_text().splitlines()
    except OSError:
        return None
    rooms: list[int] = []
    for line in lines:
        hierarchy, _, rest = line.partition(":")
        controllers, _, path = rest.partition(":")
        if hierarchy == "0" and controllers == "":  # v2: the unified hierarchy
            dirs, limit_file, usage_file, unlimited = cgroup_dirs(root, path), "memory.max", "memory.current", None
        elif "memory" in controllers.split(","):  # v1: the memory controller's own hierarchy
            dirs, limit_file, usage_file, unlimited = (cgroup_dirs(root / "memory", path), "memory.limit_in_bytes",
                                                       "memory.usage_in_bytes", _V1_UNLIMITED)
        else:
            continue
        for d in dirs:
            limit = _read_int(d / limit_file)
            if limit is None or (unlimited is not None and limit >= unlimited):
                continue
            rooms.append(max(0, limit - (_read_int(d / usage_file) or 0)))
    return min(rooms) if rooms else None


def available_bytes(*, root: Path | None = None, self_cgroup: Path | None = None,
                    meminfo: Path = Path("/proc/meminfo")) -> int:
    """What this process may still allocate on the host: MemAvailable, bounded by its cgroup's room."""
    host = available_host_bytes(meminfo)
    room = cgroup_room_bytes(root=root or CGROUP_ROOT, self_cgroup=self_cgroup or SELF_CGROUP)
    if room is not None and room < host:
        log.info("memory cgroup limit: %.1f GiB left of it (host MemAvailable %.1f GiB)", room / 2**30, host / 2**30)
        return room
    return host


def kv_budget_bytes(kv_memory: str | None, *, device: str, ranks_on_host: int = 1) -> int:
    """One rank's KV cache bytes: ``--kv-memory`` as given (a per-rank size), else a share of its
    device's free memory, or on CPU of the memory the process may still take (``available_bytes``:
    the host's, bounded by the cgroup's limit) split between the host's ranks. The engine further
    caps the blocks at what its sequences could use (max_num_seqs x max context)."""
    if kv_memory is not None:
        return parse_size(kv_memory)
    if device.startswith("cuda"):
        import torch

        free, _total = torch.cuda.mem_get_info()
        return int(free * CUDA_FREE_SHARE)
    return int(available_bytes() * CPU_FREE_SHARE) // ranks_on_host
