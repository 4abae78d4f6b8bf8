"""The Python client against a real balancer and a slow echo group: a request the caller gives up
on stops taking a running slot within a step or two (``status`` shows it), also on Ctrl-C in
``ryzanstein submit``; a Completion says which group served it and when."""

from __future__ import annotations

import json
import signal
import subprocess
import sys

import pytest
import redis

from broker.errors import WaitTimeout
from broker.keys import Keys
from producer.client import Client
from tests.integration.conftest import Procs, final_events, wait_for, wait_groups

pytestmark = pytest.mark.integration
STEP_MS = 50  # the echo group's time per token
LONG = "x" * 20_000  # 1,000 s of tokens at that pace: it only ends when cancelled


def running(r: redis.Redis, keys: Keys, group: str) -> int:
    return int(r.hget(keys.group_info(group), "running") or -1)


def token_count(r: redis.Redis, keys: Keys, rid: str) -> int:
    return sum(1 for _, f in r.xrange(keys.result(rid)) if f[b"event"] == b"token")


def test_a_client_timeout_frees_the_running_slot(procs: Procs, r: redis.Redis, keys: Keys, redis_url: str) -> None:
    procs.balancer()
    procs.worker("slow", RYZ_ECHO_TOKEN_DELAY_MS=str(STEP_MS))
    wait_groups(r, keys, {"slow"})
    with Client(redis_url, prefix=keys.prefix) as client:
        handle = client.submit(LONG, max_tokens=len(LONG), stream=True)
        wait_for(lambda: running(r, keys, "slow") == 1, timeout=10, what="the request to run")
        with pytest.raises(WaitTimeout):
            client.result(handle, timeout=0.5)
        published = token_count(r, keys, handle.id)  # the cancel is on its way already
        done = client.result(handle, timeout=10)
        assert done.finish_reason == "cancelled"
        # the group stopped at its next step or so: a few tokens past what was out when the cancel went
        assert published <= done.completion_tokens <= published + 4, (published, done.completion_tokens)
        wait_for(lambda: running(r, keys, "slow") == 0, timeout=5, what="status to show the slot free")

        # a Completion says who served it and when
        served = client.generate("hello", max_tokens=5, timeout=10)
        assert (served.group, served.model) == ("slow", "echo")
        assert served.queue_s is not None and served.ttft_s is not None and served.total_s is not None
        assert 0 <= served.queue_s <= served.ttft_s <= served.total_s
        assert served.total_s - served.ttft_s >= 3 * STEP_MS / 1000 * 0.9  # four more tokens, a step each


def test_ctrl_c_in_submit_cancels_the_request(procs: Procs, r: redis.Redis, keys: Keys,
                                              subprocess_env: dict[str, str]) -> None:
    procs.balancer()
    procs.worker("slow", RYZ_ECHO_TOKEN_DELAY_MS=str(STEP_MS))
    wait_groups(r, keys, {"slow"})
    submit = subprocess.Popen([sys.executable, "-m", "ryzanstein", "submit", LONG, "--max-tokens", str(len(LONG)),
                               "--stream", "--id", "ctrl-c"], env=subprocess_env,
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        wait_for(lambda: token_count(r, keys, "ctrl-c") >= 3, timeout=20, what="tokens to stream")
        submit.send_signal(signal.SIGINT)
        _, err = submit.communicate(timeout=10)
    finally:
        if submit.poll() is None:
            submit.kill()
    assert submit.returncode == 130, err
    assert b"cancelled" in err
    [final] = wait_for(lambda: final_events(r, keys.result("ctrl-c")), timeout=5, what="the final event")
    assert final[b"finish_reason"] == b"cancelled"
    assert json.loads(final[b"token_ids"]) and int(final[b"completion_tokens"]) < len(LONG)
    wait_for(lambda: running(r, keys, "slow") == 0, timeout=5, what="status to show the slot free")
