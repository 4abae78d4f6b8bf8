"""A chat model stops at the end of its turn: the tokenizer's EOS ends generation even where
generation_config.json names another one (the issue's failing input), as transformers' chat usage
(``generate(eos_token_id=[...both...])``) and vLLM do; ``stop_token_ids`` end it too."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from broker.protocol import SamplingParams
from gpu_workers.engine import EngineRequest
from gpu_workers.engine_mapping import engine_sampling
from gpu_workers.output import OutputState
from tests.gpu_workers.test_llm_engine import engine_for, generate
from tests.integration.test_chat_registry import MESSAGES, chat_model

NEW_TOKENS = 12


def greedy(model_dir: Path, prompt: list[int], *, eos: list[int] | None) -> list[int]:
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    ids = torch.tensor([prompt])
    with torch.inference_mode():
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=NEW_TOKENS, do_sample=False,
                             eos_token_id=eos, pad_token_id=0)
    return out[0, len(prompt):].tolist()


@pytest.mark.parametrize("generation_eos", [0, [0, 1]])
def test_the_tokenizers_end_of_turn_stops_a_model_whose_generation_config_names_another(
        tmp_path: Path, generation_eos: object) -> None:
    probe = chat_model(tmp_path / "probe", generation_eos=generation_eos)
    auto = AutoTokenizer.from_pretrained(str(probe))
    prompt = auto.apply_chat_template(MESSAGES, add_generation_prompt=True, tokenize=True,
                                      return_dict=True)["input_ids"]
    free = greedy(probe, prompt, eos=[])  # what the model writes with no EOS at all
    at = next(i for i in range(2, len(free)) if free[i] not in free[:i] and free[i] not in (0, 1))
    turn_end = free[at]
    # The same weights, whose tokenizer says that token ends a turn (as <|im_end|> does a ChatML model's).
    model = chat_model(tmp_path / "chat", eos_token=auto.convert_ids_to_tokens(turn_end),
                       generation_eos=generation_eos)
    chat_usage = greedy(model, prompt, eos=[*([generation_eos] if isinstance(generation_eos, int)
                                             else generation_eos), turn_end])
    assert chat_usage == free[: at + 1]

    engine = engine_for(model)
    assert turn_end in engine.info.eos_token_ids
    sampling = engine_sampling(SamplingParams(max_tokens=NEW_TOKENS, temperature=0.0))
    [ours] = generate(engine, [EngineRequest("r", prompt, sampling)]).values()
    assert ours == chat_usage  # ends at the turn's end, inventing no further turn


def test_stop_token_ids_end_generation_at_any_of_them(tmp_path: Path) -> None:
    model = chat_model(tmp_path / "chat")
    auto = AutoTokenizer.from_pretrained(str(model))
    prompt = auto.apply_chat_template(MESSAGES, add_generation_prompt=True, tokenize=True,
                                      return_dict=True)["input_ids"]
    free = greedy(model, prompt, eos=[])
    stop_at = next(i for i, t in enumerate(free) if t not in free[:i] and i >= 2)
    sampling = SamplingParams(max_tokens=NEW_TOKENS, temperature=0.0, stop_token_ids=(free[stop_at], 99999))
    engine = engine_for(model)
    out = OutputState(sampling=sampling, prompt_ids=prompt, tokenizer=engine.tokenizer,
                      eos_token_ids=engine.info.eos_token_ids, max_context=engine.info.max_context)
    assert not set(free[:stop_at]) & engine.info.eos_token_ids
    results = []
    for token in free:
        results.append(out.push(token))
        if out.finished:
            break
    assert len(results) == stop_at + 1 and results[-1].finish_reason == "stop"
