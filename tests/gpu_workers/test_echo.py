"""The echo engine: one prompt token per running request per step, 'stop' on the last one."""

from __future__ import annotations

from gpu_workers.echo import EchoEngine
from gpu_workers.engine import EngineRequest, StepOutput
from gpu_workers.sampling_params import SamplingParams


def request(rid: str, prompt: list[int], **kwargs: object) -> EngineRequest:
    return EngineRequest(rid, prompt, SamplingParams(), **kwargs)  # type: ignore[arg-type]


def test_info_and_tokenizer() -> None:
    engine = EchoEngine(max_context=77)
    assert engine.info.model == "echo"
    assert engine.info.vocab_size == 256 and engine.info.max_context == 77
    assert engine.tokenizer.decode(engine.tokenizer.encode("héllo")) == "héllo"


def test_one_token_per_step_then_stop_at_the_end_of_the_prompt() -> None:
    engine = EchoEngine()
    engine.add(request("a", [5, 6, 7]))
    assert engine.has_work() and engine.stats().running == 1
    steps = [engine.step() for _ in range(3)]
    assert steps == [[StepOutput("a", 5)], [StepOutput("a", 6)], [StepOutput("a", 7, "stop")]]
    assert not engine.has_work()
    assert engine.step() == []
    assert engine.stats().running == 0


def test_requests_advance_together() -> None:
    engine = EchoEngine()
    engine.add(request("a", [1, 2]))
    engine.add(request("b", [9]))
    assert engine.step() == [StepOutput("a", 1), StepOutput("b", 9, "stop")]
    assert engine.step() == [StepOutput("a", 2, "stop")]
    assert not engine.has_work()


def test_abort_drops_the_request_and_ignores_unknown_ids() -> None:
    engine = EchoEngine()
    engine.add(request("a", [1, 2, 3]))
    engine.add(request("b", [4, 5]))
    engine.step()
    engine.abort("a")
    engine.abort("never-added")
    assert engine.step() == [StepOutput("b", 5, "stop")]
    assert not engine.has_work()


def test_output_ids_continue_after_tokens_generated_elsewhere() -> None:
    engine = EchoEngine()
    engine.add(request("a", [1, 2, 3], output_ids=[1, 2]))
    assert engine.step() == [StepOutput("a", 3, "stop")]


def test_close_drops_everything() -> None:
    engine = EchoEngine()
    engine.add(request("a", [1, 2, 3]))
    engine.close()
    assert not engine.has_work() and engine.step() == []


def test_token_delay_makes_each_step_take_that_long() -> None:
    slept: list[float] = []
    engine = EchoEngine(token_delay_s=0.02, sleep=slept.append)
    assert engine.step() == [] and slept == []  # nothing to do: no delay
    engine.add(request("a", [1, 2]))
    engine.add(request("b", [3]))
    engine.step()
    assert slept == [0.02]  # one step, however many requests it advances


def test_a_moved_request_continues_after_its_output_ids() -> None:
    engine = EchoEngine()
    engine.add(request("m", [5, 6, 7, 8], output_ids=[5, 6]))
    assert [engine.step() for _ in range(2)] == [[StepOutput("m", 7)], [StepOutput("m", 8, "stop")]]


def test_not_started_lists_what_was_added_since_the_last_step() -> None:
    engine = EchoEngine()
    engine.add(request("a", [1, 2, 3]))
    engine.add(request("b", [4, 5]))
    assert engine.not_started() == ["a", "b"]
    engine.step()
    engine.add(request("c", [6, 7]))
    engine.abort("b")
    assert engine.not_started() == ["c"]
    engine.step()
    assert engine.not_started() == []
