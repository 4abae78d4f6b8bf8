"""Finding the request an engine step raised on, so that one bad request never stops a group.

When a step raises with one request in the engine, that request is the one: it ends with error
``internal``. With several, all leave the engine and come back one at a time (probation): each is
started alone and stepped once; the one whose step raises is ended, the others are cleared and run
together again afterwards, continuing from the tokens they have (``output_ids``). A request that
fails only together with others is never blamed; one that fails on a given token fails again when
stepped alone at that token (a failed step produced no token). Plain Python, no engine.
"""

from __future__ import annotations

from collections import deque

from gpu_workers.holding import Held, Holding


class Isolation:
    def __init__(self, holding: Holding) -> None:
        self.holding = holding
        self._suspects: deque[str] = deque()
        self._cleared: list[str] = []
        self.active = False

    def failed(self, running: list[Held]) -> Held | None:
        """A step raised with ``running`` in the engine: the request to blame, if it is known."""
        if len(running) == 1:
            return running[0]
        self._suspects.extend(h.request.id for h in sorted(running, key=lambda h: h.seq))
        self.active = True
        return None

    def next_suspect(self) -> Held | None:
        """The next request to step alone; None when all were tried (probation ends, the cleared ones
        are queued again)."""
        while self._suspects:
            held = self.holding.get(self._suspects.popleft())
            if held is not None and not held.final:
                return held
        for rid in self._cleared:
            held = self.holding.get(rid)
            if held is not None and not held.final:
                self.holding.queue(held)
        self._cleared.clear()
        self.active = False
        return None

    def passed(self, held: Held) -> None:
        """``held`` stepped alone without failing."""
        self._cleared.append(held.request.id)

    def clear(self) -> None:
        self._suspects.clear()
        self._cleared.clear()
        self.active = False
