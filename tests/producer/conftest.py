"""A stand-in for the balancer and worker groups: a thread that answers requests as the protocol says.

It parses each ingress entry with the real ``broker.validation.parse_request`` (so a client that sends
a malformed request gets the same ``invalid_request`` error it would get from a balancer) and writes
events with the real PUBLISH script. Prompts steer it:

- ``fail:<code>``  ends with an ``error`` event of that code
- ``hang``         writes nothing until the request is cancelled (then ``done``, ``cancelled``)
- anything else    echoes the prompt back, one whitespace-led word per token (``<id>`` per prompt id),
                   truncated to ``max_tokens``
"""

from __future__ import annotations

import collections
import re
import threading
from collections.abc import Iterator
from typing import Any

import pytest
import redis

from broker.chat import PLAIN_CHAT_TEMPLATE, publish_template
from broker.errors import InvalidRequest
from broker.events import done_event, error_event, token_event
from broker.keys import Keys, companion
from broker.protocol import GenerationRequest
from broker.registry import GroupLoad
from broker.scripts import Scripts, pack_events, publish_result
from broker.validation import best_effort_reply_to, parse_request

PUBLISHER = "test-responder"
TTL_MS = 60_000


def echo_pieces(request: GenerationRequest) -> list[str]:
    if request.prompt_ids is not None:
        return [f"<{t}>" for t in request.prompt_ids]
    return re.findall(r"\s*\S+", request.prompt or "")


class Responder:
    """Answers every request on ``keys.requests`` from a background thread."""

    def __init__(self, url: str, keys: Keys) -> None:
        self.keys = keys
        self.redis = redis.Redis.from_url(url)
        self.scripts = Scripts(self.redis)
        self.requests: list[GenerationRequest] = []
        self.finals: collections.Counter[str] = collections.Counter()
        self.hanging: dict[str, GenerationRequest] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="responder", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
        self.redis.close()

    def _run(self) -> None:
        last: dict[Any, Any] = {self.keys.requests: "0-0", self.keys.cancel: "0-0"}
        while not self._stop.is_set():
            try:
                reply = self.redis.xread(last, count=200, block=50)
            except redis.ConnectionError:
                continue  # a test killed our connection; redis-py reconnects on the next call
            for stream, entries in reply:
                stream = stream.decode()
                for entry_id, fields in entries:
                    last[stream] = entry_id
                    if stream == self.keys.requests:
                        self._answer(entry_id.decode(), fields)
                    else:
                        self._cancel(fields[b"id"].decode())

    def _publish(self, request_id: str, reply_to: str, events: list[tuple[str, int, dict[str, str]]]) -> None:
        # The state key is per (reply stream, request): Keys.state(reply_to) alone would be shared by
        # every request on one client's reply stream (see the report on broker.keys).
        state = companion(reply_to, f"state:{request_id}")
        assert state == Keys.state(reply_to, request_id)
        raw = self.scripts.publish(reply_stream=reply_to, progress=Keys.progress(reply_to, request_id),
                                   publisher=PUBLISHER, epoch=1, ttl_ms=TTL_MS, events=pack_events(events))
        assert publish_result(raw).status == "ok", raw
        if events and events[-1][0] == "f":
            self.finals[request_id] += 1

    def _answer(self, entry_id: str, fields: dict[bytes, bytes]) -> None:
        try:
            request = parse_request(
                fields, entry_id=entry_id, prefix=self.keys.prefix, max_request_bytes=1 << 20
            )
        except InvalidRequest as exc:
            request_id, reply_to = best_effort_reply_to(fields, entry_id=entry_id, prefix=self.keys.prefix)
            self._publish(request_id, reply_to, [("f", 0, error_event(request_id, exc.code, str(exc)))])
            return
        self.requests.append(request)
        prompt = request.prompt or ""
        if prompt.startswith("fail:"):
            event = error_event(request.id, prompt.removeprefix("fail:"), "the responder was told to fail")
            self._publish(request.id, request.reply_to, [("f", 0, event)])
        elif prompt == "hang":
            self.hanging[request.id] = request
        else:
            pieces = echo_pieces(request)
            kept = pieces[: request.sampling.max_tokens]
            token_ids = [1000 + i for i in range(len(kept))]
            events = []
            if request.stream:
                events = [
                    ("t", i, token_event(request.id, i, t, text))
                    for i, (t, text) in enumerate(zip(token_ids, kept, strict=True))
                ]
            reason = "length" if len(kept) < len(pieces) else "stop"
            done = done_event(
                request.id,
                text="".join(kept),
                token_ids=token_ids,
                finish_reason=reason,
                prompt_tokens=len(pieces),
            )
            self._publish(request.id, request.reply_to, [*events, ("f", len(events), done)])

    def _cancel(self, request_id: str) -> None:
        request = self.hanging.pop(request_id, None)
        if request is not None:
            done = done_event(request_id, text="", token_ids=[], finish_reason="cancelled", prompt_tokens=1)
            self._publish(request_id, request.reply_to, [("f", 0, done)])


@pytest.fixture
def responder(redis_url: str, keys: Keys) -> Iterator[Responder]:
    answering = Responder(redis_url, keys)
    answering.start()
    yield answering
    answering.stop()


def register_group(r: redis.Redis, keys: Keys, name: str = "stub", *, served: tuple[str, ...] = ("echo",),
                   template: str | None = PLAIN_CHAT_TEMPLATE, bos_token: str = "", eos_token: str = "") -> None:
    """A group in the registry as a worker registers one (heartbeat, published chat template), for
    clients that read the registry; the Responder answers the requests."""
    load = GroupLoad(name=name, tp=1, model=served[0], kv_dtype="none", kv_capacity_tokens=0, kv_used_tokens=0,
                     running=0, waiting=0, queue_depth=0, leader_pid=1, host="h", max_context=4096,
                     vocab_size=256, served_models=list(served), bos_token=bos_token, eos_token=eos_token,
                     chat_template=publish_template(r, keys, template) if template is not None else "")
    Scripts(r).heartbeat(registry=keys.groups, info=keys.group_info(name), group=name, fields=load.to_fields())
