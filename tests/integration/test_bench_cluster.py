"""``benchmarks/pipeline.py --cluster``: its options, and its smallest pieces on a real 1-master
cluster (tests/redis_cluster.py builds that one by hand: ``redis-cli --cluster create`` wants 3)."""

from __future__ import annotations

import shutil

import pytest

from benchmarks.pipeline import parse_args
from benchmarks.pipeline_cluster import raw_round_trips
from tests.redis_cluster import LocalCluster

pytestmark = pytest.mark.integration


def test_cluster_options_parse() -> None:
    args = parse_args(["--cluster", "--masters", "1", "3", "--shards", "1", "4", "8", "--requests", "100"])
    assert (args.cluster, args.masters, args.shards, args.requests) == (True, [1, 3], [1, 4, 8], 100)
    default = parse_args([])
    assert (default.cluster, default.masters, default.shards) == (False, [1, 3], [1, 4])


@pytest.mark.skipif(shutil.which("redis-server") is None or shutil.which("redis-cli") is None,
                    reason="no redis-server / redis-cli on PATH")
def test_one_master_cluster_and_its_raw_round_trip() -> None:
    with LocalCluster(masters=1) as cluster:
        [(master, ranges)] = cluster.primaries().items()
        assert ranges == [(0, 16383)]
        replica = next(p for p in cluster.live_ports() if p != master)
        with cluster.node(replica) as conn:
            assert conn.info("replication")["role"] == "slave"
        trips = raw_round_trips(f"redis://127.0.0.1:{master}", 5)
    assert len(trips) == 5 and all(0 < t < 10 for t in trips)
