"""The wire protocol's request: ``SamplingParams`` and ``GenerationRequest`` (as validated, and as
queued: ``to_wire``/``from_wire``, ``to_ingress`` when handed back), the limits on their fields, and
the checks against a model (``limit_problem``).

Where the rest lives: ingress entries -> requests (``broker.validation``: ``parse_request``), result
events -> fields (``broker.events``), the event and error codes (docs/PROTOCOL.md).
"""

from __future__ import annotations

import re
from typing import Any, Literal

import msgpack
from pydantic import BaseModel, ConfigDict, Field
from redis.typing import EncodableT, FieldT

from broker.signing import SIGNATURE_FIELD, sign
from broker.structured import StructuredOutput

ID_RE = re.compile(r"[A-Za-z0-9_.:-]{1,128}")
ENTRY_ID_RE = re.compile(r"[0-9]+-[0-9]+")  # a stream entry id, as XADD * makes them
# A served model name: a directory's last component, a hub id ("org/name"), an alias; no spaces.
MODEL_NAME_RE = re.compile(r"[A-Za-z0-9_.:/@+=-]{1,256}")
FinishReason = Literal["stop", "length", "cancelled"]
INT64_MIN, UINT64_MAX = -(1 << 63), (1 << 64) - 1
MAX_STOP_STRINGS = 16
MAX_STOP_TOKEN_IDS = 64
MAX_KEY_BYTES = 512
MAX_TOKEN_BYTES = 256
MAX_LOGIT_BIAS = 1024  # entries of one request's logit_bias
MAX_BAD_WORDS = 128
LOGIT_BIAS_LIMIT = 100.0  # |bias| at most, as OpenAI's API
MAX_TOP_LOGPROBS = 20  # as OpenAI's API
MAX_N = 128  # completions of one request (n, best_of), as OpenAI's API bounds n


class SamplingParams(BaseModel):
    """How to pick tokens; validated bounds match CONTRACT.md."""

    model_config = ConfigDict(frozen=True, strict=True)

    max_tokens: int = Field(default=16, ge=1, le=1 << 31)
    temperature: float = Field(default=1.0, ge=0.0, le=1e6)
    top_p: float = Field(default=1.0, gt=0.0, le=1.0)
    top_k: int = Field(default=0, ge=0, le=1 << 31)
    seed: int | None = Field(default=None, ge=INT64_MIN, le=UINT64_MAX)
    stop: tuple[str, ...] = Field(default=(), max_length=MAX_STOP_STRINGS)
    stop_token_ids: tuple[int, ...] = Field(default=(), max_length=MAX_STOP_TOKEN_IDS)  # end on any of them
    # --- sampling controls, with vLLM's meanings (docs/PROTOCOL.md, "Sampling controls") ---
    presence_penalty: float = Field(default=0.0, ge=-2.0, le=2.0)
    frequency_penalty: float = Field(default=0.0, ge=-2.0, le=2.0)
    repetition_penalty: float = Field(default=1.0, gt=0.0, le=2.0)
    min_p: float = Field(default=0.0, ge=0.0, le=1.0)
    min_tokens: int = Field(default=0, ge=0, le=1 << 31)
    ignore_eos: bool = False
    logit_bias: tuple[tuple[int, float], ...] = Field(default=(), max_length=MAX_LOGIT_BIAS)  # (token id, bias)
    bad_words: tuple[str, ...] = Field(default=(), max_length=MAX_BAD_WORDS)
    # With it, max_tokens is a ceiling: a prompt that leaves less room in the model's context gets
    # the room it leaves (the gateway's chat requests without max_tokens), not invalid_request.
    fit_max_tokens: bool = False
    # --- logprobs (docs/PROTOCOL.md, "Logprobs") ---
    logprobs: bool = False  # token and done events carry each generated token's logprob
    top_logprobs: int = Field(default=0, ge=0, le=MAX_TOP_LOGPROBS)  # and this many likeliest alternatives
    # The prompt tokens' logprobs, with this many likeliest alternatives each (None: not asked).
    prompt_logprobs: int | None = Field(default=None, ge=0, le=MAX_TOP_LOGPROBS)
    # --- several completions (docs/PROTOCOL.md, "Several completions") ---
    n: int = Field(default=1, ge=1, le=MAX_N)  # completions returned
    best_of: int | None = Field(default=None, ge=1, le=MAX_N)  # generated, the n likeliest returned (None: n)

    # --- structured output (docs/PROTOCOL.md, "Structured output"): what the completion must match ---
    structured: StructuredOutput | None = None

    @property
    def num_sequences(self) -> int:
        """Completions generated: ``best_of``, else ``n``."""
        return self.best_of if self.best_of is not None else self.n

    def for_choice(self, choice: int, *, leader: bool = True) -> SamplingParams:
        """The parameters of completion ``choice`` (0-based) of a request with several, as the
        engine runs it: seed ``seed + choice`` (vLLM's rule: each completion is reproducible on its
        own, and completion 0 is what the request with n=1 gives); with ``best_of`` > ``n``, logprobs
        on (the ranking needs them); prompt logprobs on the ``leader`` only (one prefill computes them)."""
        if self.num_sequences == 1 and leader:
            return self
        update: dict[str, Any] = {"n": 1, "best_of": None}
        if self.seed is not None:
            update["seed"] = (self.seed + choice) & UINT64_MAX
        if self.num_sequences > self.n:
            update["logprobs"] = True
        if not leader:
            update["prompt_logprobs"] = None
        return self.model_copy(update=update)

    @property
    def needed_tokens(self) -> int:
        """The fewest tokens the request needs room for after its prompt (``limit_problem``)."""
        return 1 if self.fit_max_tokens else self.max_tokens

    @classmethod
    def from_dump(cls, raw: dict[str, Any]) -> SamplingParams:
        """The inverse of ``model_dump`` after a msgpack round trip (arrays come back as lists)."""
        raw = dict(raw)
        for name in ("stop", "stop_token_ids", "bad_words"):
            if name in raw:
                raw[name] = tuple(raw[name])
        if "logit_bias" in raw:
            raw["logit_bias"] = tuple((int(t), float(b)) for t, b in raw["logit_bias"])
        if isinstance(raw.get("structured"), dict):
            raw["structured"] = StructuredOutput(**raw["structured"])
        return cls(**raw)


class GenerationRequest(BaseModel):
    """One validated request, as the balancer forwards it to a worker group."""

    model_config = ConfigDict(frozen=True, strict=True)

    id: str = Field(pattern=f"^{ID_RE.pattern}$", min_length=1, max_length=128)  # pydantic searches: anchor it
    prompt: str | None = None
    prompt_ids: tuple[int, ...] | None = None
    sampling: SamplingParams = SamplingParams()
    stream: bool = False
    priority: int = Field(default=0, ge=INT64_MIN, le=(1 << 63) - 1)
    timeout_s: float | None = Field(default=None, gt=0.0)
    reply_to: str
    # A secret of the client's: only a cancel entry that carries it ends the request (broker.cancellation).
    cancel_token: str | None = Field(default=None, repr=False)
    # The served model name asked for; the balancer sets the one it routed to before dispatch.
    model: str | None = Field(default=None, pattern=f"^{MODEL_NAME_RE.pattern}$")
    # Milliseconds on the Redis clock when the request first entered the ingress stream.
    enqueued_ms: int = 0
    # The tenant whose ingress stream the request came in on (broker.sources); None: the shared one.
    # Only that tenant's cancel stream cancels it.
    tenant: str | None = Field(default=None, pattern=r"^[A-Za-z0-9_.-]{1,64}$")
    # Set when a group hands the request back (draining) or is failed over: the balancer takes the
    # request over from this owner, if it still holds this epoch (see broker.lua.CLAIM_OWNER).
    takeover_from: str | None = None
    takeover_epoch: int = 0
    # Set by the balancer when it dispatches a request taken over mid-generation: the token ids
    # already published, which the new group continues after (never on the ingress stream).
    output_ids: tuple[int, ...] = ()
    # The same for a request with several completions (n > 1): the ids published per completion.
    choice_output_ids: tuple[tuple[int, ...], ...] = ()
    # Fingerprint of the weights that generated ``output_ids`` (set by the balancer at dispatch): a
    # group with other weights refuses to continue such a request (no answer mixes two versions).
    weights: str | None = None

    @property
    def deadline_ms(self) -> float | None:
        """When the request times out, on the Redis clock; None without ``timeout_s``."""
        if self.timeout_s is None:
            return None
        return self.enqueued_ms + self.timeout_s * 1000.0

    def to_wire(self) -> bytes:
        packed: bytes = msgpack.packb(self.model_dump(mode="python"), use_bin_type=True)
        return packed

    def to_ingress(self, *, from_owner: str, epoch: int, signing_key: bytes) -> dict[FieldT, EncodableT]:
        """Fields that put this request back on the ingress stream, taken over from ``from_owner``:
        a msgpack ``payload`` with the internal fields, signed under ``signing_key`` (broker.signing)."""
        payload = {
            "id": self.id,
            "prompt": self.prompt,
            "prompt_ids": list(self.prompt_ids) if self.prompt_ids is not None else None,
            **self.sampling.model_dump(exclude={"stop", "stop_token_ids", "logit_bias", "bad_words", "structured"}),
            **(self.sampling.structured.to_fields() if self.sampling.structured is not None else {}),
            "stop": list(self.sampling.stop),
            "stop_token_ids": list(self.sampling.stop_token_ids) or None,
            "logit_bias": {str(t): b for t, b in self.sampling.logit_bias},
            "bad_words": list(self.sampling.bad_words),
            "model": self.model,
            "stream": self.stream,
            "priority": self.priority,
            "timeout_s": self.timeout_s,
            "reply_to": self.reply_to,
            "cancel_token": self.cancel_token,
            "_enqueued_ms": self.enqueued_ms,
            "_takeover": [from_owner, epoch],
            "_weights": self.weights,
            "_tenant": self.tenant,
        }
        packed = msgpack.packb({k: v for k, v in payload.items() if v is not None}, use_bin_type=True)
        return {"payload": packed, SIGNATURE_FIELD: sign(signing_key, packed)}

    @classmethod
    def from_wire(cls, data: bytes) -> GenerationRequest:
        raw = msgpack.unpackb(data, raw=False)
        raw["sampling"] = SamplingParams.from_dump(raw["sampling"])
        for name in ("prompt_ids", "output_ids"):
            if raw.get(name) is not None:
                raw[name] = tuple(raw[name])
        if raw.get("choice_output_ids") is not None:
            raw["choice_output_ids"] = tuple(tuple(ids) for ids in raw["choice_output_ids"])
        return cls(**raw)


def is_later_entry_id(request_id: str, entry_id: str) -> bool:
    """Whether ``request_id`` reads as a stream entry id at or after ``entry_id`` (the request's own)."""
    if not ENTRY_ID_RE.fullmatch(request_id) or not ENTRY_ID_RE.fullmatch(entry_id):
        return False
    ms, seq = request_id.split("-")
    own_ms, own_seq = entry_id.split("-")
    return (int(ms), int(seq)) >= (int(own_ms), int(own_seq)) and request_id != entry_id


def entry_ms(entry_id: str | bytes) -> int:
    """The millisecond part of a stream entry id ("1700000000000-0")."""
    if isinstance(entry_id, bytes):
        entry_id = entry_id.decode()
    return int(entry_id.split("-", 1)[0])


def limit_problem(prompt_ids: list[int] | tuple[int, ...], max_tokens: int, *, vocab_size: int,
                  max_context: int, logit_bias: tuple[tuple[int, float], ...] = ()) -> str | None:
    """Why a tokenized request cannot run on a model (vocabulary, context length), or None.
    ``max_tokens``: the room it needs after the prompt (``SamplingParams.needed_tokens``)."""
    if not prompt_ids:
        return "the prompt encodes to no tokens"
    top = max(prompt_ids)
    if top >= vocab_size:
        return f"prompt_ids: token id {top} is outside the vocabulary (size {vocab_size})"
    need = len(prompt_ids) + max_tokens
    if logit_bias and (bad := max(t for t, _ in logit_bias)) >= vocab_size:
        return f"logit_bias: token id {bad} is outside the vocabulary (size {vocab_size})"
    if need > max_context:
        return (f"prompt ({len(prompt_ids)} tokens) + max_tokens ({max_tokens}) = {need} exceeds the "
                f"model's context length of {max_context}")
    return None
