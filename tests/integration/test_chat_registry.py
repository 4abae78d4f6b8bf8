"""Chat rendered from the registry: a gateway and a Python client with no model files render the
template the model's group publishes, to the token ids of transformers' ``apply_chat_template``;
and a chat model stops at its tokenizer's end of turn whatever generation_config.json says."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import httpx
import pytest
import redis
from transformers import AutoTokenizer

from broker.keys import Keys
from gpu_workers.hf_tokenizer import load_tokenizer
from producer.client import Client
from tests.gpu_workers import tokenizer_fixtures as fixtures
from tests.gpu_workers.reference import save_hf_model
from tests.integration.conftest import Procs, wait_for, wait_groups

pytestmark = pytest.mark.integration
ROOT = Path(__file__).resolve().parents[2]
CHATML = ("{{ bos_token }}{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
          "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
MESSAGES = [{"role": "system", "content": "Be brief, café."}, {"role": "user", "content": "Hi there 🦀"}]


def chat_model(path: Path, *, eos_token: str = "<|im_end|>", generation_eos: object = 0) -> Path:
    """A small chat checkpoint: Llama 3 style byte-level tokenizer, ChatML template in
    chat_template.jinja, and (the issue's failing input) a generation_config.json naming another EOS."""
    save_hf_model(path, family="llama", seed=3, vocab_size=704)
    (path / "tokenizer.json").write_text(fixtures.byte_level_json(bos_template=True), encoding="utf-8")
    (path / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<|begin_of_text|>", "eos_token": eos_token}))
    (path / "chat_template.jinja").write_text(CHATML, encoding="utf-8")
    (path / "generation_config.json").write_text(json.dumps({"eos_token_id": generation_eos}))
    return path


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return chat_model(tmp_path_factory.mktemp("chat") / "chat-model")


def test_gateway_and_client_without_model_files_render_transformers_ids(
        procs: Procs, r: redis.Redis, keys: Keys, redis_url: str, model_dir: Path, tmp_path: Path) -> None:
    auto = AutoTokenizer.from_pretrained(str(model_dir))
    expected_text = auto.apply_chat_template(MESSAGES, add_generation_prompt=True, tokenize=False)
    expected_ids = auto.apply_chat_template(MESSAGES, add_generation_prompt=True, tokenize=True,
                                            return_dict=True)["input_ids"]
    served = tmp_path / "served" / "chat-model"  # the worker's copy; the gateway never sees a path
    shutil.copytree(model_dir, served)
    empty = tmp_path / "gateway-cwd"
    empty.mkdir()
    procs.worker("chat", "--model", str(served), "--kv-dtype", "fp32")  # no balancer yet: requests stay put
    wait_groups(r, keys, {"chat"}, timeout=60)
    pythonpath = os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))
    procs.spawn("producer", "gateway", "--port", "0", env={"PYTHONPATH": pythonpath}, cwd=empty)
    log = procs.log_dir / f"{len(procs.started) - 1:02d}-producer.log"
    url = wait_for(lambda: next((line.split()[3] for line in log.read_text(errors="replace").splitlines()
                                 if line.startswith("ryzanstein gateway: serving ")), None),
                   timeout=30, what="the gateway")
    shutil.rmtree(served)  # nothing of the model is left on disk but in the worker's memory

    models = httpx.get(f"{url}/models", timeout=10).json()["data"]
    info = {k.decode(): v.decode() for k, v in r.hgetall(keys.group_info("chat")).items()}
    assert [(m["id"], m["max_model_len"]) for m in models] == [("chat-model", int(info["max_context"]))]

    with pytest.raises(httpx.ReadTimeout):
        httpx.post(f"{url}/chat/completions", json={"model": "chat-model", "messages": MESSAGES, "max_tokens": 2},
                   timeout=3)
    [(_entry, fields)] = r.xrange(keys.requests)
    prompt = fields[b"prompt"].decode()
    assert prompt == expected_text and fields[b"model"] == b"chat-model"
    assert load_tokenizer(model_dir, vocab_size=704).tokenizer.encode(prompt) == expected_ids
    with Client(redis_url, prefix=keys.prefix) as client:
        assert client.render_chat(MESSAGES) == expected_text
        assert client.render_chat(MESSAGES, model="chat-model") == expected_text

        procs.balancer()
        done = client.chat(MESSAGES, max_tokens=3, temperature=0.0, timeout=60)
        assert done.prompt_tokens == len(expected_ids)
    reply = httpx.post(f"{url}/chat/completions", timeout=60,
                       json={"model": "chat-model", "messages": MESSAGES, "max_tokens": 3, "temperature": 0})
    assert reply.json()["usage"]["prompt_tokens"] == len(expected_ids)
    unknown = httpx.post(f"{url}/chat/completions", timeout=10, json={"model": "nope", "messages": MESSAGES})
    assert unknown.status_code == 404 and unknown.json()["error"]["code"] == "model_not_found"
