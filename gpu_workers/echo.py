"""The ``echo`` engine: no model, returns the prompt's tokens. For measuring the pipeline alone.

One token per running request per step, like a model decoding; the last prompt token ends the
request with finish_reason "stop" (as an EOS would), unless max_tokens ends it first. A request that
arrives with ``output_ids`` (moved from another group) continues after them. ``token_delay_s`` makes
each step take that long, like a model's decode step (``RYZ_ECHO_TOKEN_DELAY_MS``). Sampling
parameters change nothing; a request that asks for logprobs gets 0 for each token (it was certain),
and itself as its one alternative; prompt logprobs are 0 too, with no alternatives. Imports no torch.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Callable

from broker.chat import PLAIN_CHAT_TEMPLATE
from gpu_workers.engine import EngineInfo, EngineRequest, EngineStats, Rejection, StepOutput, TokenLogprobs
from gpu_workers.tokenizer import ByteTokenizer

ECHO_MAX_CONTEXT = 1 << 20


class EchoEngine:
    def __init__(self, *, max_context: int = ECHO_MAX_CONTEXT, token_delay_s: float = 0.0,
                 sleep: Callable[[float], None] = time.sleep) -> None:
        self.tokenizer = ByteTokenizer()
        self.token_delay_s = token_delay_s
        self._sleep = sleep
        self.info = EngineInfo(model="echo", vocab_size=256, max_context=max_context,
                               chat_template=PLAIN_CHAT_TEMPLATE)
        # request id -> (prompt ids, position of the next token to echo)
        self._running: OrderedDict[str, tuple[list[int], int]] = OrderedDict()
        self._added: set[str] = set()  # since the last step: not started yet
        self._logprobs: dict[str, int] = {}  # request id -> top_logprobs, for those that asked
        self._prompt_logprobs: set[str] = set()  # request ids that asked, until their first token

    def add(self, request: EngineRequest) -> None:
        self._running[request.request_id] = (request.prompt_ids, len(request.output_ids))
        self._added.add(request.request_id)
        if request.sampling.logprobs:
            self._logprobs[request.request_id] = request.sampling.top_logprobs
        if request.sampling.prompt_logprobs is not None:
            self._prompt_logprobs.add(request.request_id)

    def abort(self, request_id: str) -> None:
        self._running.pop(request_id, None)
        self._added.discard(request_id)
        self._logprobs.pop(request_id, None)
        self._prompt_logprobs.discard(request_id)

    def step(self) -> list[StepOutput]:
        if self.token_delay_s > 0 and self._running:
            self._sleep(self.token_delay_s)
        self._added.clear()
        out = []
        for request_id, (prompt, pos) in list(self._running.items()):
            last = pos + 1 >= len(prompt)
            top = self._logprobs.get(request_id)
            logprobs = TokenLogprobs(0.0, ((prompt[pos], 0.0),) if top else ()) if top is not None else None
            prompt_logprobs = None
            if request_id in self._prompt_logprobs:  # each prompt token after the first: certain
                self._prompt_logprobs.discard(request_id)
                prompt_logprobs = (None, *(TokenLogprobs(0.0) for _ in prompt[1:]))
            out.append(StepOutput(request_id, prompt[pos], "stop" if last else None, logprobs, prompt_logprobs))
            if last:
                del self._running[request_id]
                self._logprobs.pop(request_id, None)
            else:
                self._running[request_id] = (prompt, pos + 1)
        return out

    def rejected(self) -> list[Rejection]:
        return []  # structured output, like every sampling field, is ignored here

    def has_work(self) -> bool:
        return bool(self._running)

    def not_started(self) -> list[str]:
        return [rid for rid in self._running if rid in self._added]

    def stats(self) -> EngineStats:
        return EngineStats(running=len(self._running), waiting=0)

    def close(self) -> None:
        self._running.clear()
        self._added.clear()
