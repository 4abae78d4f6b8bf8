"""Several models on one Redis, as real processes: two echo groups under their own served names
(one with an alias), random:tiny, and a saved transformers checkpoint. Every request is answered only by a group of its
model (its token ids are that model's greedy tokens, and its owner a group serving that name); an
unknown name is refused at once; a model whose only group is killed waits for a group of its own
while the others serve."""

from __future__ import annotations

import signal
from pathlib import Path

import pytest
import redis

from broker.errors import RequestFailed
from broker.keys import Keys
from broker.registry import GroupStatus, read_groups
from gpu_workers.model.presets import materialize
from producer.client import Client
from tests.gpu_workers.reference import MIN_MARGIN, hf_greedy, save_hf_model
from tests.integration.conftest import Procs, wait_for, wait_groups

pytestmark = [pytest.mark.integration, pytest.mark.slow]
NEW_TOKENS = 4
PROMPTS = [[3, 17, 101], [250, 8, 8, 42, 7], [64] * 9, [1, 2, 3, 4, 5, 6, 7]]
FAST = {"RYZ_HEARTBEAT_INTERVAL_S": "0.2", "RYZ_DEAD_AFTER_S": "1.5"}


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_hf_model(tmp_path_factory.mktemp("models") / "ckpt-chat", family="llama", seed=5)


def owner(r: redis.Redis, keys: Keys, request_id: str) -> str:
    return r.hget(keys.state(keys.result(request_id), request_id), "owner").decode()


def serve(client: Client, model: str, n: int, tag: str) -> list[tuple[str, int, list[int]]]:
    """``n`` greedy requests for ``model``, prompts in turn: (request id, prompt index, token ids)."""
    handles = [(client.submit(prompt_ids=PROMPTS[i % len(PROMPTS)], max_tokens=NEW_TOKENS, temperature=0.0,
                              model=model, request_id=f"{tag}-{i}"), i % len(PROMPTS)) for i in range(n)]
    return [(h.id, p, client.result(h, timeout=120).token_ids) for h, p in handles]


def test_each_model_answers_only_its_own_requests(procs: Procs, r: redis.Redis, keys: Keys, redis_url: str,
                                                  checkpoint: Path) -> None:
    tiny = hf_greedy(materialize("tiny"), PROMPTS, NEW_TOKENS)
    ckpt = hf_greedy(checkpoint, PROMPTS, NEW_TOKENS)
    assert ckpt.min_margin >= MIN_MARGIN  # (tiny's reads NaN: generate masks its EOS to -inf)
    expected = {"echo-a": [p[:NEW_TOKENS] for p in PROMPTS], "echo-b": [p[:NEW_TOKENS] for p in PROMPTS],
                "random:tiny": tiny.tokens, "ckpt-chat": ckpt.tokens}
    assert len({str(v) for v in expected.values()}) == 3  # the llama models' greedy tokens differ from echo's
    expected["echo-a2"] = expected["echo-a"]  # an alias of echo-a
    groups = {"echo-a": {"e1"}, "echo-a2": {"e1"}, "echo-b": {"e2"}, "random:tiny": {"tiny"}, "ckpt-chat": {"ckpt"}}

    procs.balancer(**FAST, RYZ_NO_GROUP_WAIT_S="300")  # ckpt-chat's requests wait out its restart
    procs.worker("e1", "--served-model-name", "echo-a", "echo-a2", **FAST)
    procs.worker("e2", "--served-model-name", "echo-b", **FAST)
    procs.worker("tiny", "--model", "random:tiny", "--kv-dtype", "fp32", **FAST)
    ckpt_proc = procs.worker("ckpt", "--model", str(checkpoint), "--kv-dtype", "fp32", **FAST)
    wait_groups(r, keys, {"e1", "e2", "tiny", "ckpt"}, timeout=90)

    with Client(redis_url, prefix=keys.prefix) as client:
        for model, n in (("echo-a", 200), ("echo-a2", 50), ("echo-b", 200), ("random:tiny", 100),
                         ("ckpt-chat", 100)):
            for request_id, prompt, token_ids in serve(client, model, n, model.replace(":", "-")):
                assert token_ids == expected[model][prompt], (model, request_id)
                assert owner(r, keys, request_id) in groups[model], (model, request_id)

        with pytest.raises(RequestFailed) as unknown:
            client.generate("hi", model="smollm2", timeout=60)
        assert unknown.value.code == "model_not_found" and "ckpt-chat" in unknown.value.message
        with pytest.raises(RequestFailed) as unnamed:
            client.generate("hi", timeout=60)
        assert unnamed.value.code == "invalid_request" and "echo-a, echo-a2, echo-b" in unnamed.value.message

        # the only group of ckpt-chat dies with requests in flight; random:tiny keeps serving
        in_flight = [client.submit(prompt_ids=PROMPTS[i % 4], max_tokens=NEW_TOKENS, temperature=0.0,
                                   model="ckpt-chat", request_id=f"moved-{i}") for i in range(40)]
        ckpt_proc.send_signal(signal.SIGKILL)
        ckpt_proc.wait()
        waiting = [client.submit(prompt_ids=PROMPTS[i % 4], max_tokens=NEW_TOKENS, temperature=0.0,
                                 model="ckpt-chat", request_id=f"waits-{i}") for i in range(40)]
        for request_id, prompt, token_ids in serve(client, "random:tiny", 40, "tiny-meanwhile"):
            assert token_ids == tiny.tokens[prompt] and owner(r, keys, request_id) == "tiny"
        wait_for(lambda: not any(g.alive for g in _groups(r, keys) if g.name == "ckpt"), what="ckpt dead")
        assert not any(r.exists(keys.result(f"waits-{i}")) for i in range(40))  # waiting, not misrouted

        procs.worker("ckpt2", "--model", str(checkpoint), "--kv-dtype", "fp32", **FAST)
        for i, handle in enumerate(in_flight + waiting):
            assert client.result(handle, timeout=120).token_ids == ckpt.tokens[i % 4], handle.id
            assert owner(r, keys, handle.id) in {"ckpt", "ckpt2"}, handle.id
        assert {owner(r, keys, f"waits-{i}") for i in range(40)} == {"ckpt2"}


def _groups(r: redis.Redis, keys: Keys) -> list[GroupStatus]:
    return read_groups(r, keys, dead_after_s=1.5)
