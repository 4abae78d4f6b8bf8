"""Which rank a process is, from torchrun's variables, and the group size --tp and WORLD_SIZE agree on."""

from __future__ import annotations

import pytest

from broker.errors import ConfigError
from gpu_workers.parallel.launch import LEADER_PID_ENV, RankEnv, group_size, rank_env

TORCHRUN = {"RANK": "3", "WORLD_SIZE": "4", "LOCAL_RANK": "1", "LOCAL_WORLD_SIZE": "2",
            "MASTER_ADDR": "node-a", "MASTER_PORT": "29500"}


def test_rank_from_torchrun_variables() -> None:
    assert rank_env({}) is None
    assert rank_env(TORCHRUN) == RankEnv(rank=3, world_size=4, local_rank=1, local_world_size=2,
                                         master_addr="node-a", master_port=29500, spawned=False)
    spawned = rank_env({**TORCHRUN, LEADER_PID_ENV: "42"})
    assert spawned is not None and spawned.spawned
    minimal = rank_env({"RANK": "1", "WORLD_SIZE": "2", "MASTER_ADDR": "h", "MASTER_PORT": "1"})
    assert minimal is not None and (minimal.local_rank, minimal.local_world_size) == (1, 2)


@pytest.mark.parametrize(("env", "message"), [
    ({"RANK": "0", "WORLD_SIZE": "2", "MASTER_ADDR": "h"}, "RANK is set but MASTER_PORT is not"),
    ({**TORCHRUN, "MASTER_PORT": "x"}, "bad torchrun variable"),
])
def test_incomplete_torchrun_variables(env: dict[str, str], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        rank_env(env)


def test_group_size_from_tp_or_world_size() -> None:
    assert group_size(None, {}) == 1
    assert group_size(2, {}) == 2
    assert group_size(None, TORCHRUN) == 4
    assert group_size(4, TORCHRUN) == 4
    with pytest.raises(ConfigError, match="--tp 2 but WORLD_SIZE is 4"):
        group_size(2, TORCHRUN)
    with pytest.raises(ConfigError, match="at least 1"):
        group_size(0, {})
