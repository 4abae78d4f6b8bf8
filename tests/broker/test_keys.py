"""Key names: companions share their key's Redis Cluster hash slot, as every Lua script requires.

The slot oracle is a real redis-server in cluster mode (``CLUSTER KEYSLOT``), cross-checked against a
CRC16/XMODEM written out here.
"""

from __future__ import annotations

import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis
from hypothesis import given, settings
from hypothesis import strategies as st

from broker.embedded import free_port, redis_server_binary
from broker.keys import Keys, companion, hash_tag
from broker.keys import key_slot as broker_key_slot

SLOTS = 16384


def crc16_xmodem(data: bytes) -> int:
    crc = 0
    for byte in data:
        crc ^= byte << 8
        for _ in range(8):
            crc = ((crc << 1) ^ 0x1021) if crc & 0x8000 else crc << 1
            crc &= 0xFFFF
    return crc


def key_slot(key: str) -> int:
    """Redis Cluster's rule: hash the part between the first '{' and the next '}' if non-empty."""
    data = key.encode()
    start = data.find(b"{")
    if start >= 0:
        end = data.find(b"}", start + 1)
        if end > start + 1:
            data = data[start + 1 : end]
    return crc16_xmodem(data) % SLOTS


def _bus_port_free(port: int) -> bool:
    with socket.socket() as sock:
        try:
            sock.bind(("127.0.0.1", port + 10000))
        except OSError:
            return False
    return True


def _start_cluster_node(data: Path) -> tuple[subprocess.Popen[bytes], redis.Redis] | None:
    """A cluster-enabled redis-server, or None when it could not take its ports (a race: try again)."""
    port = free_port()
    # Cluster mode also listens on the bus port, port + 10000, which must exist and be free.
    while port + 10000 > 65535 or not _bus_port_free(port):
        port = free_port()
    proc = subprocess.Popen(
        [
            redis_server_binary(),
            "--port",
            str(port),
            "--bind",
            "127.0.0.1",
            "--dir",
            str(data),
            "--save",
            "",
            "--appendonly",
            "no",
            "--cluster-enabled",
            "yes",
            "--cluster-config-file",
            str(data / f"nodes-{port}.conf"),
            "--logfile",
            str(data / "redis.log"),
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    client = redis.Redis(host="127.0.0.1", port=port, socket_connect_timeout=1)
    deadline = time.monotonic() + 10
    while True:  # poll until it answers; the server needs a few ms to start
        try:
            client.ping()
            return proc, client
        except redis.ConnectionError:
            if proc.poll() is not None or time.monotonic() > deadline:
                client.close()
                proc.kill()
                proc.wait()
                return None
            time.sleep(0.01)


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[redis.Redis]:
    """A cluster-enabled redis-server: it answers CLUSTER KEYSLOT even with no slots assigned."""
    data = tmp_path_factory.mktemp("cluster")
    for _ in range(5):
        started = _start_cluster_node(data)
        if started is not None:
            break
    else:
        pytest.fail(f"cluster-mode redis-server did not start: {(data / 'redis.log').read_text()[-1000:]}")
    proc, client = started
    try:
        yield client
    finally:
        client.close()
        proc.terminate()
        proc.wait(10)


def server_slot(cluster: redis.Redis, key: str) -> int:
    return int(cluster.execute_command("CLUSTER", "KEYSLOT", key))


TRICKY_KEYS = [
    "ryz:result:abc",
    "ryz:result:1700000000000-0",
    "{tag}:x",
    "a{tag}b",
    "{a}{b}",
    "a{}b",
    "{}abc",
    "{}",
    "{",
    "}",
    "a}b",
    "a{b",
    "}{a}",
    "a{}b}c",
    "{{a}}",
    "a{b{c}d}",
    "plain",
    "x" * 512,
    "é{ü}",
    "é}",
    "{ }",
    "",
]


def test_crc16_matches_the_reference_vector() -> None:
    assert crc16_xmodem(b"123456789") == 0x31C3


@pytest.mark.parametrize("key", TRICKY_KEYS)
def test_local_slot_rule_agrees_with_redis(cluster: redis.Redis, key: str) -> None:
    assert key_slot(key) == server_slot(cluster, key)


@pytest.mark.parametrize("key", TRICKY_KEYS)
def test_broker_key_slot_agrees_with_redis(cluster: redis.Redis, key: str) -> None:
    assert broker_key_slot(key) == server_slot(cluster, key)


@pytest.mark.parametrize("key", TRICKY_KEYS)
def test_hash_tag_is_what_redis_hashes(key: str) -> None:
    tag = hash_tag(key)
    if tag is None:
        assert key_slot(key) == crc16_xmodem(key.encode()) % SLOTS
    else:
        assert tag and "}" not in tag
        assert key_slot(key) == crc16_xmodem(tag.encode()) % SLOTS


@pytest.mark.parametrize(
    ("key", "tag"),
    [("{t}x", "t"), ("a{b}c{d}", "b"), ("{}x", None), ("x", None), ("x{", None), ("{{a}}", "{a")],
)
def test_hash_tag_examples(key: str, tag: str | None) -> None:
    assert hash_tag(key) == tag


@pytest.mark.parametrize("key", TRICKY_KEYS)
def test_companion_shares_the_slot_redis_computes(cluster: redis.Redis, key: str) -> None:
    other = companion(key, "state")
    assert other != key
    assert server_slot(cluster, other) == server_slot(cluster, key)


def test_companion_keeps_an_existing_tag() -> None:
    assert companion("{ryz:g:a}:queue", "x") == "{ryz:g:a}:queue:x"


def test_companion_of_an_untagged_key_is_readable() -> None:
    assert companion("ryz:result:abc", "state") == "{ryz:result:abc}:state"


@settings(max_examples=400, deadline=None)
@given(st.text(alphabet=st.sampled_from("ab{}:é-"), max_size=12) | st.text(max_size=20))
def test_companion_same_slot_for_any_key(key: str) -> None:
    assert key_slot(companion(key, "state")) == key_slot(key)


@settings(max_examples=300, deadline=None)
@given(
    st.text(alphabet=st.sampled_from("ab{}:"), min_size=1, max_size=8),
    st.text(alphabet=st.sampled_from("ab{}:"), min_size=1, max_size=8),
)
def test_distinct_untagged_keys_get_distinct_companions(a: str, b: str) -> None:
    # Two keys hashed as a whole share a companion only if they are the same key.
    if a != b and hash_tag(a) is None and hash_tag(b) is None:
        assert companion(a, "state") != companion(b, "state")


@pytest.mark.parametrize("request_id", ["abc", "1700000000000-0", "a.b:c_d-e", "A" * 128])
def test_request_state_shares_the_reply_stream_slot(cluster: redis.Redis, request_id: str) -> None:
    keys = Keys("ryz")
    reply = keys.result(request_id)
    assert server_slot(cluster, keys.state(reply, request_id)) == server_slot(cluster, reply)


@pytest.mark.parametrize("reply_to", ["my:replies", "{app}:replies", "replies}1", "{}r", "ryz:client:42"])
def test_state_of_a_custom_reply_stream_shares_its_slot(cluster: redis.Redis, reply_to: str) -> None:
    assert server_slot(cluster, Keys.state(reply_to, "req-1")) == server_slot(cluster, reply_to)


@pytest.mark.parametrize("reply_to", ["ryz:client:42", "{app}:replies", "replies}1"])
def test_requests_sharing_a_reply_stream_have_their_own_state(cluster: redis.Redis, reply_to: str) -> None:
    states = {Keys.state(reply_to, rid) for rid in ("a", "b", "1700000000000-0")}
    assert len(states) == 3
    assert {server_slot(cluster, k) for k in states} == {server_slot(cluster, reply_to)}
    assert Keys.state("r:1", "x") != Keys.state("r:2", "x")


@pytest.mark.parametrize("prefix", ["ryz", "t1234abcd", "app:ryz"])
@pytest.mark.parametrize("group", ["g0", "gpu-node-1", "a.b"])
def test_group_keys_share_a_slot(cluster: redis.Redis, prefix: str, group: str) -> None:
    keys = Keys(prefix)
    per_group = [
        keys.group_queue(group),
        keys.group_accepting(group),
        keys.dispatch_marker(group, "req-1", 1),
        keys.dispatch_marker(group, "1700000000000-0", 99),
    ]
    assert len({server_slot(cluster, k) for k in per_group}) == 1
    # HEARTBEAT touches the registry zset and the group's info hash together.
    assert server_slot(cluster, keys.group_info(group)) == server_slot(cluster, keys.groups)


def test_key_names_follow_the_contract() -> None:
    keys = Keys("p")
    assert keys.requests == "p:requests"
    assert keys.cancel == "p:cancel"
    assert keys.result("abc") == "p:result:abc"
    assert Keys().prefix == "ryz"
    assert Keys().requests == "ryz:requests"


def test_key_names_are_distinct_and_stay_under_their_prefix() -> None:
    def names(keys: Keys) -> list[str]:
        return [
            keys.requests,
            keys.cancel,
            keys.result("r"),
            keys.state(keys.result("r"), "r"),
            keys.groups,
            keys.group_info("g"),
            keys.group_queue("g"),
            keys.group_accepting("g"),
            keys.dispatch_marker("g", "r", 1),
            keys.client_replies("c"),
        ]

    a, b = names(Keys("one")), names(Keys("two"))
    assert len(set(a)) == len(a)
    assert not set(a) & set(b)
    assert all(name.lstrip("{").startswith("one:") for name in a)


def test_dispatch_markers_differ_by_request_and_epoch() -> None:
    keys = Keys("p")
    markers = {keys.dispatch_marker("g", r, e) for r in ("a", "b") for e in (1, 2)}
    assert len(markers) == 4
