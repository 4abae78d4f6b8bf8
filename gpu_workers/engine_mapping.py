"""The boundary between the service and the engine: a validated ``broker.protocol`` request's
sampling fields as the engine's own ``gpu_workers.sampling_params`` types, and the engine's
rejections (``RejectionReason``) as the error codes of docs/PROTOCOL.md.

The group loop (gpu_workers.steps) maps every request here before ``Engine.add``, and every request
the engine drops (a ``Rejection``, or an ``EngineRequestError`` raised by ``add``) back here.
What the engine does not read (stop strings, ``n``/``best_of``, ``fit_max_tokens``) stays with the
group: ``SamplingParams.for_choice`` splits a request of several completions before the mapping.
"""

from __future__ import annotations

from broker import protocol
from broker.errors import InvalidRequest, RyzansteinError
from broker.structured import StructuredOutput
from gpu_workers.engine import RejectionReason
from gpu_workers.sampling_params import SamplingParams, StructuredSpec

# The ``error`` event code a request the engine dropped ends with, by the engine's reason.
REJECTION_CODES: dict[RejectionReason, str] = {
    RejectionReason.UNSERVABLE: InvalidRequest.code,  # invalid_request: the client must change it
    RejectionReason.FAILED: RyzansteinError.code,  # internal: the server's failure, not the request's
}


def error_code(reason: RejectionReason) -> str:
    """The protocol error code (docs/PROTOCOL.md) of a request the engine dropped for ``reason``."""
    return REJECTION_CODES[reason]


def engine_structured(structured: StructuredOutput) -> StructuredSpec:
    """The service's structured-output constraint as the engine's."""
    return StructuredSpec(kind=structured.kind, spec=structured.spec, field=structured.field)


def engine_sampling(sampling: protocol.SamplingParams) -> SamplingParams:
    """The fields of one completion's ``sampling`` that the engine reads. Raises ValueError for a
    request of several completions (map each ``sampling.for_choice(c)``)."""
    if sampling.num_sequences != 1:
        raise ValueError(f"{sampling.num_sequences} completions: map each for_choice(c) instead")
    return SamplingParams(
        max_tokens=sampling.max_tokens,
        temperature=sampling.temperature,
        top_p=sampling.top_p,
        top_k=sampling.top_k,
        seed=sampling.seed,
        stop_token_ids=sampling.stop_token_ids,
        presence_penalty=sampling.presence_penalty,
        frequency_penalty=sampling.frequency_penalty,
        repetition_penalty=sampling.repetition_penalty,
        min_p=sampling.min_p,
        min_tokens=sampling.min_tokens,
        ignore_eos=sampling.ignore_eos,
        logit_bias=sampling.logit_bias,
        bad_words=sampling.bad_words,
        logprobs=sampling.logprobs,
        top_logprobs=sampling.top_logprobs,
        prompt_logprobs=sampling.prompt_logprobs,
        structured=engine_structured(sampling.structured) if sampling.structured is not None else None,
    )
