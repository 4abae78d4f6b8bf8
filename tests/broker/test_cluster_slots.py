"""Redis Cluster: every Lua script touches keys of one hash slot, for every kind of reply stream, and
no pipeline is a MULTI transaction (a cluster runs a pipeline node by node, a transaction only within
one slot). Checked on the key names (broker.keys.key_slot) and on a real cluster, where a script's
keys in two slots fail with CROSSSLOT."""

from __future__ import annotations

import ast
from pathlib import Path
from typing import Any

import msgpack
import pytest
import redis

from broker.connection import connect
from broker.keys import QUEUE_GROUP, Keys, key_slot
from broker.scripts import Scripts, _Script, pack_events
from broker.settings import Settings
from broker.wire import Batch

ROOT = Path(__file__).resolve().parents[2]
RID = "r-1"


class Recorder:
    """A ``Pipe`` that keeps the KEYS of each script call."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, list[str]]] = []

    def evalsha(self, sha: str, numkeys: int, *keys_and_args: Any) -> int:
        self.calls.append((sha, [str(k) for k in keys_and_args[:numkeys]]))
        return len(self.calls) - 1


def reply_streams(keys: Keys) -> list[str]:
    """Every kind of reply stream a request can name (PROTOCOL.md ``reply_to``)."""
    return [keys.result(RID), keys.reply_stream(RID, tenant="acme"), keys.client_replies("c0ffee"),
            keys.client_replies("c0ffee", tenant="acme"), keys.batch_replies("job-1"), "app:replies",
            "{app}:replies", "replies{x}:of:{y}", "x{}y"]


def call_every_script(scripts: Scripts, keys: Keys, reply: str, client: Any) -> None:
    """Each script once, with the keys the services pass it (group ``g1``, request ``RID``)."""
    progress = keys.progress(reply, RID)
    scripts.claim_owner(progress=progress, group="g1", ttl_ms=60_000, reply_stream=reply, client=client)
    scripts.dispatch(queue=keys.group_queue("g1"), marker=keys.dispatch_marker("g1", RID, 1),
                     accepting=keys.group_accepting("g1"), queue_tokens=keys.group_queue_tokens("g1"),
                     request=msgpack.packb({"id": RID}), epoch=1, marker_ttl_ms=60_000, cost=3, client=client)
    scripts.publish(reply_stream=reply, progress=progress, publisher="g1", epoch=1, ttl_ms=60_000,
                    events=pack_events([]), client=client)
    scripts.ack(queue=keys.group_queue("g1"), queue_tokens=keys.group_queue_tokens("g1"),
                consumer_group=QUEUE_GROUP, entry_ids=[b"1-0"], client=client)
    scripts.retire_queue(queue=keys.group_queue("g1"), queue_tokens=keys.group_queue_tokens("g1"), client=client)
    scripts.read_ingress(ingress=keys.requests, consumer_group="balancers", consumer="b1", count=10,
                         max_entry_bytes=1024, client=client)
    scripts.read_cancels(cancel_stream=keys.cancel, after=b"0-0", count=10, max_field_bytes=64, client=client)
    scripts.heartbeat(registry=keys.groups, info=keys.group_info("g1"), group="g1", fields=["load", "0"],
                      client=client)


def test_every_script_is_called_with_keys_of_one_slot() -> None:
    keys = Keys("ryz")
    scripts = Scripts(redis.Redis())  # SHAs only: nothing is sent
    for reply in reply_streams(keys):
        recorder = Recorder()
        call_every_script(scripts, keys, reply, recorder)
        all_scripts = {v.sha for v in vars(scripts).values() if isinstance(v, _Script)}
        assert {sha for sha, _keys in recorder.calls} == all_scripts  # none left out
        for sha, script_keys in recorder.calls:
            assert len({key_slot(k) for k in script_keys}) == 1, (sha, script_keys)


@pytest.mark.parametrize("reply", reply_streams(Keys("ryz")))
def test_every_script_runs_on_a_real_cluster(cluster_url: str, reply: str) -> None:
    client = connect(cluster_url, Settings())
    keys = Keys("ryz")
    client.xgroup_create(keys.group_queue("g1"), QUEUE_GROUP, id="0", mkstream=True)
    client.xgroup_create(keys.requests, "balancers", id="0", mkstream=True)
    client.set(keys.group_accepting("g1"), "1")
    scripts = Scripts(client)
    call_every_script(scripts, keys, reply, None)  # direct calls: CROSSSLOT would raise
    batch = Batch()
    call_every_script(scripts, keys, reply, batch)  # the hot path: every script in one ClusterWire batch
    failed = [r for r in scripts.wire.execute(batch) if isinstance(r, Exception)]
    assert failed == []
    scripts.wire.close()
    client.close()


def _pipeline_calls(tree: ast.AST) -> list[ast.Call]:
    return [node for node in ast.walk(tree) if isinstance(node, ast.Call)
            and isinstance(node.func, ast.Attribute) and node.func.attr in ("pipeline", "multi", "watch")]


def test_no_pipeline_is_a_transaction() -> None:
    """``pipeline(transaction=False)`` everywhere: a MULTI over keys of several slots fails on a cluster."""
    found = 0
    for package in ("balancer", "broker", "gpu_workers", "producer", "ryzanstein"):
        for path in (ROOT / package).rglob("*.py"):
            if path == ROOT / "broker" / "cluster_client.py":
                continue  # ClusterClient.pipeline forwards its caller's flag to redis-py's
            for call in _pipeline_calls(ast.parse(path.read_text())):
                found += 1
                where = f"{path.relative_to(ROOT)}:{call.lineno}"
                assert call.func.attr == "pipeline", where  # type: ignore[attr-defined]
                flags = {k.arg: k.value for k in call.keywords}
                assert isinstance(flags.get("transaction"), ast.Constant), where
                assert flags["transaction"].value is False, where  # type: ignore[attr-defined]
    assert found > 10
