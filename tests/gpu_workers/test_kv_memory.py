"""The default KV budget on CPUs respects the memory cgroup (containers, Kubernetes pods): fake
cgroup trees of both versions are passed in, as a pod's and a systemd service's would look."""

from __future__ import annotations

from pathlib import Path

import pytest

from gpu_workers.kv_memory import available_bytes, cgroup_room_bytes

GiB = 2**30


def _files(root: Path, files: dict[str, str]) -> None:
    for name, text in files.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text(text + "\n")


def _meminfo(tmp: Path, available: int) -> Path:
    path = tmp / "meminfo"
    path.write_text(f"MemTotal: {256 * GiB // 1024} kB\nMemAvailable: {available // 1024} kB\n")
    return path


@pytest.mark.parametrize(("self_cgroup", "files", "room"), [
    # v2, in a pod's cgroup namespace: the path is "/", the root is the pod's cgroup
    ("0::/", {"memory.max": str(8 * GiB), "memory.current": str(1 * GiB)}, 7 * GiB),
    # v2 seen from the host: the limit of an ancestor (the pod) binds its container's cgroup
    ("0::/kubepods/pod1/ctr", {"kubepods/pod1/memory.max": str(8 * GiB), "kubepods/pod1/memory.current": "0",
                               "kubepods/pod1/ctr/memory.max": "max", "kubepods/pod1/ctr/memory.current": "5"},
     8 * GiB),
    # v2, both limited: the tighter room wins
    ("0::/svc", {"svc/memory.max": str(4 * GiB), "svc/memory.current": str(3 * GiB),
                 "memory.max": str(16 * GiB), "memory.current": str(2 * GiB)}, 1 * GiB),
    # v2 without a limit anywhere
    ("0::/svc", {"svc/memory.max": "max", "svc/memory.current": "123"}, None),
    # v1: the memory controller's hierarchy, a Docker container's path
    ("4:memory:/docker/abc\n1:cpu:/docker/abc",
     {"memory/docker/abc/memory.limit_in_bytes": str(2 * GiB),
      "memory/docker/abc/memory.usage_in_bytes": str(GiB // 2)}, 3 * GiB // 2),
    # v1 unlimited: the largest page-aligned long
    ("4:memory:/", {"memory/memory.limit_in_bytes": "9223372036854771712", "memory/memory.usage_in_bytes": "1"},
     None),
    # v1, the process' path absent from this mount namespace: the mount's root is its cgroup
    ("4:cpuacct,memory:/process_api/x", {"memory/memory.limit_in_bytes": str(GiB),
                                         "memory/memory.usage_in_bytes": "0"}, GiB),
    # over the limit already: no room, never negative
    ("0::/", {"memory.max": str(GiB), "memory.current": str(2 * GiB)}, 0),
])
def test_cgroup_room_is_limit_less_usage_tightest_over_ancestors(tmp_path: Path, self_cgroup: str,
                                                                 files: dict[str, str], room: int | None) -> None:
    root = tmp_path / "cgroup"
    root.mkdir()
    _files(root, files)
    (tmp_path / "self").write_text(self_cgroup + "\n")
    assert cgroup_room_bytes(root=root, self_cgroup=tmp_path / "self") == room


def test_no_cgroups_mounted_means_no_limit(tmp_path: Path) -> None:
    assert cgroup_room_bytes(root=tmp_path / "none", self_cgroup=tmp_path / "missing") is None


def test_an_8_gib_pod_on_a_256_gib_node_budgets_from_its_limit(tmp_path: Path) -> None:
    root = tmp_path / "cgroup"
    root.mkdir()
    _files(root, {"memory.max": str(8 * GiB), "memory.current": str(2 * GiB)})  # weights loaded: 2 GiB used
    (tmp_path / "self").write_text("0::/\n")
    meminfo = _meminfo(tmp_path, 250 * GiB)
    assert available_bytes(root=root, self_cgroup=tmp_path / "self", meminfo=meminfo) == 6 * GiB
    # a host with less available than the cgroup's room: the host's figure
    small = _meminfo(tmp_path, 3 * GiB)
    assert available_bytes(root=root, self_cgroup=tmp_path / "self", meminfo=small) == 3 * GiB
