"""The engine stands on its own request types: no engine module imports the service's protocol,
structured-output or error types, the group's mapping carries every field the engine reads, and the
engine's rejection reasons map to the protocol's error codes."""

from __future__ import annotations

import ast
import dataclasses
from pathlib import Path

import pytest

from broker.protocol import SamplingParams
from broker.structured import StructuredOutput
from gpu_workers import sampling_params
from gpu_workers.engine import RejectionReason
from gpu_workers.engine_mapping import engine_sampling, error_code

GPU_WORKERS = Path(__file__).resolve().parents[2] / "gpu_workers"
ENGINE_MODULES = ("engine.py", "sampling_params.py", "llm_engine.py", "scheduler.py", "block_manager.py",
                  "sequence.py", "sampler.py", "logits_processors.py", "structured_output.py",
                  "prompt_logprobs.py", "echo.py")
SERVICE_TYPES = {"broker.protocol", "broker.structured", "broker.validation"}


def imported(path: Path) -> set[str]:
    """What ``path`` imports: modules, and ``module.name`` for each ``from module import name``."""
    out: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            out |= {node.module, *(f"{node.module}.{a.name}" for a in node.names)}
    return out


@pytest.mark.parametrize("module", ENGINE_MODULES)
def test_engine_modules_import_no_service_request_types(module: str) -> None:
    names = imported(GPU_WORKERS / module)
    assert not names & SERVICE_TYPES, module
    assert "broker.errors.InvalidRequest" not in names, module


def test_the_mapping_carries_every_field_the_engine_reads() -> None:
    structured = StructuredOutput(kind="regex", spec="[a-z]+", field="guided_regex")
    service = SamplingParams(
        max_tokens=7, temperature=0.5, top_p=0.9, top_k=5, seed=11, stop=("x",), stop_token_ids=(3, 4),
        presence_penalty=0.1, frequency_penalty=0.2, repetition_penalty=1.1, min_p=0.05, min_tokens=2,
        ignore_eos=True, logit_bias=((1, 2.0),), bad_words=("no",), logprobs=True, top_logprobs=3,
        prompt_logprobs=1, structured=structured)
    engine = engine_sampling(service)
    for f in dataclasses.fields(sampling_params.SamplingParams):
        if f.name == "structured":
            assert engine.structured == sampling_params.StructuredSpec("regex", "[a-z]+", "guided_regex")
        else:
            assert getattr(engine, f.name) == getattr(service, f.name), f.name
        assert getattr(engine, f.name) != f.default, f"{f.name}: the case above must set it"
    assert engine_sampling(SamplingParams()) == sampling_params.SamplingParams()  # the same defaults


def test_several_completions_are_mapped_one_by_one() -> None:
    service = SamplingParams(n=2, seed=5)
    with pytest.raises(ValueError, match="for_choice"):
        engine_sampling(service)
    assert [engine_sampling(service.for_choice(c)).seed for c in range(2)] == [5, 6]


def test_engine_rejections_map_to_protocol_error_codes() -> None:
    """The engine says why it dropped a request in its own terms; the service's mapping gives the
    client's code: a request that can never run is the client's to change, a failure is the server's."""
    assert {reason: error_code(reason) for reason in RejectionReason} == {
        RejectionReason.UNSERVABLE: "invalid_request", RejectionReason.FAILED: "internal"}
    assert not {reason.value for reason in RejectionReason} & {"invalid_request", "internal"}
    assert "broker.errors" not in imported(GPU_WORKERS / "engine.py")
