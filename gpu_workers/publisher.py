"""Events out of a worker group: one pipeline of PUBLISH calls per step.

PUBLISH (broker.scripts) fences by owner and epoch and writes token indices in order, once. The
queue entry of a request is acknowledged only after its final event is written; the group's queue
consumer (broker.consumer) owns those acknowledgements.
"""

from __future__ import annotations

import logging

from broker.connection import TRANSIENT_ERRORS
from broker.keys import Keys
from broker.scripts import Scripts, pack_events, publish_result
from broker.wire import Batch
from gpu_workers.holding import Event, Held

log = logging.getLogger(__name__)


class Publisher:
    def __init__(self, scripts: Scripts, keys: Keys, *, group: str, ttl_ms: int) -> None:
        self.scripts = scripts
        self.keys = keys
        self.group = group
        self.ttl_ms = ttl_ms
        self._dirty: dict[str, Held] = {}  # held requests with events to publish
        self.errors: dict[str, Exception] = {}  # request id -> why its last publish failed ('error')

    def emit(self, held: Held, event: Event) -> None:
        held.events.append(event)
        self._dirty[held.request.id] = held

    def discard(self, held: Held) -> None:
        self._dirty.pop(held.request.id, None)

    def clear(self) -> None:
        self._dirty.clear()

    def publish(self) -> list[tuple[Held, str]]:
        """Write every pending event; (held, PUBLISH status or 'error') for each request written to.

        On a lost connection nothing is cleared: the same events go out again (PUBLISH is idempotent).
        """
        batch = [h for h in self._dirty.values() if h.events]
        self._dirty.clear()
        if not batch:
            return []

        def build(pipe: Batch) -> None:
            for held in batch:
                reply, rid = held.request.reply_to, held.request.id
                self.scripts.publish(reply_stream=reply, progress=self.keys.progress(reply, rid),
                                     publisher=self.group, epoch=held.epoch, ttl_ms=self.ttl_ms,
                                     events=pack_events(held.events), client=pipe)

        try:
            _, results = self.scripts.execute(build)
            for raw in results:
                if isinstance(raw, TRANSIENT_ERRORS):
                    raise raw
        except BaseException:
            self._dirty.update((h.request.id, h) for h in batch)
            raise
        out: list[tuple[Held, str]] = []
        for held, raw in zip(batch, results):
            held.events.clear()
            if isinstance(raw, Exception):
                # e.g. reply_to names a key of another type: nothing can be delivered there
                log.error("request %s: cannot publish to %r: %s", held.request.id, held.request.reply_to, raw)
                self.errors[held.request.id] = raw
                out.append((held, "error"))
            else:
                out.append((held, publish_result(raw).status))
        return out
