"""A CPU worker's torch threads: as many as the CPUs it may use (affinity capped by the cgroup's CPU
quota, both versions, fake trees passed in), shared between a host's ranks, ``--threads`` over all;
and the passive OpenMP wait policy set before torch loads, unless the operator chose one."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from broker.errors import ConfigError
from gpu_workers.cpu_threads import cgroup_cpu_limit, torch_threads, usable_cpus

ROOT = Path(__file__).resolve().parents[2]


def _tree(tmp: Path, self_cgroup: str, files: dict[str, str]) -> tuple[Path, Path]:
    root = tmp / "cgroup"
    root.mkdir()
    for name, text in files.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text(text + "\n")
    (tmp / "self").write_text(self_cgroup + "\n")
    return root, tmp / "self"


@pytest.mark.parametrize(("self_cgroup", "files", "limit"), [
    ("0::/", {"cpu.max": "200000 100000"}, 2.0),  # a pod's namespace: "cpus: 2"
    ("0::/", {"cpu.max": "max 100000"}, None),  # no quota
    # seen from the host: the pod's quota binds its container; the tighter of two wins
    ("0::/kubepods/pod1/ctr", {"kubepods/pod1/cpu.max": "150000 100000", "kubepods/pod1/ctr/cpu.max": "max 100000",
                               "cpu.max": "400000 100000"}, 1.5),
    # v1, a Docker container under the combined cpu,cpuacct hierarchy
    ("3:cpu,cpuacct:/docker/abc\n4:memory:/docker/abc",
     {"cpu,cpuacct/docker/abc/cpu.cfs_quota_us": "50000", "cpu,cpuacct/docker/abc/cpu.cfs_period_us": "100000"}, 0.5),
    ("1:cpu:/", {"cpu/cpu.cfs_quota_us": "-1", "cpu/cpu.cfs_period_us": "100000"}, None),  # v1 without quota
    ("0::/", {"cpu.max": "garbage"}, None),
])
def test_cgroup_cpu_limit_is_quota_over_period_tightest_over_ancestors(tmp_path: Path, self_cgroup: str,
                                                                        files: dict[str, str],
                                                                        limit: float | None) -> None:
    root, self_file = _tree(tmp_path, self_cgroup, files)
    assert cgroup_cpu_limit(root=root, self_cgroup=self_file) == limit


def test_a_two_cpu_pod_on_a_64_core_node_uses_two_threads_not_64(tmp_path: Path) -> None:
    root, self_file = _tree(tmp_path, "0::/", {"cpu.max": "200000 100000"})
    assert usable_cpus(root=root, self_cgroup=self_file, affinity=set(range(64))) == 2
    (tmp_path / "b").mkdir()
    root2, self2 = _tree(tmp_path / "b", "0::/", {"cpu.max": "150000 100000"})
    assert usable_cpus(root=root2, self_cgroup=self2, affinity=set(range(64))) == 2  # 1.5 CPUs: round up
    assert usable_cpus(root=tmp_path / "none", self_cgroup=tmp_path / "missing", affinity={0, 3, 5}) == 3
    assert usable_cpus(root=root, self_cgroup=self_file, affinity={7}) == 1  # the mask binds too


def test_threads_flag_over_omp_num_threads_over_the_cpus_shared_by_ranks() -> None:
    assert torch_threads(3, environ={"OMP_NUM_THREADS": "8"}, cpus=16) == 3
    assert torch_threads(None, environ={"OMP_NUM_THREADS": "8"}, cpus=16) is None  # torch already honours it
    assert torch_threads(None, environ={}, cpus=16) == 16
    assert torch_threads(None, ranks_on_host=4, environ={}, cpus=16) == 4
    assert torch_threads(None, ranks_on_host=4, environ={}, cpus=2) == 1
    with pytest.raises(ConfigError, match="--threads"):
        torch_threads(0, environ={}, cpus=2)


def _wait_policy_seen_by_torch(env: dict[str, str]) -> str:
    code = ("import gpu_workers, os, torch; "
            "print(os.environ.get('OMP_WAIT_POLICY'), torch.__config__.parallel_info().count('OpenMP') > 0)")
    out = subprocess.run([sys.executable, "-c", code], env=env, cwd=ROOT, capture_output=True, text=True,
                         check=True).stdout.split()
    return out[0]


def test_workers_default_to_passive_waiting_and_keep_the_operators_choice() -> None:
    env = {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"}
    env["PYTHONPATH"] = str(ROOT)
    assert _wait_policy_seen_by_torch(env) == "PASSIVE"
    assert _wait_policy_seen_by_torch({**env, "OMP_WAIT_POLICY": "ACTIVE"}) == "ACTIVE"
