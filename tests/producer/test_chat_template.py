"""Chat templates render as transformers renders them, come from the right place, and refuse safely."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from transformers.utils.chat_template_utils import render_jinja_template

from broker.chat import template_digest
from broker.errors import ConfigError, InvalidRequest, Unavailable
from broker.registry import GroupLoad
from producer.chat_template import ChatTemplate, TemplateSource, normalize_messages

CHATML = (
    "{{ bos_token }}{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}"
    "<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
# Llama-2 style: a system message folded into the first user turn, strict alternation, eos after answers.
LLAMA2 = """{% if messages[0]['role'] == 'system' %}
{% set loop_messages = messages[1:] %}{% set system = '<<SYS>>\\n' + messages[0]['content'] + '\\n<</SYS>>\\n\\n' %}
{% else %}{% set loop_messages = messages %}{% set system = '' %}{% endif %}
{% for message in loop_messages %}
{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}
{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}
{% endif %}
{% if message['role'] == 'user' %}{{ bos_token + '[INST] ' + (system if loop.first else '') + message['content'].strip() + ' [/INST]' }}
{% else %}{{ ' ' + message['content'].strip() + ' ' + eos_token }}{% endif %}
{% endfor %}"""
# Uses a namespace, tojson and loop controls, as tool-aware templates do.
FANCY = """{% set ns = namespace(n=0) %}{% for m in messages %}{% if m.role == 'system' %}{% continue %}{% endif %}
{% set ns.n = ns.n + 1 %}{{ ns.n }}. {{ m | tojson }}
{% endfor %}{% if add_generation_prompt %}>{% endif %}"""

CONVERSATION = [
    {"role": "system", "content": "Be brief. Use \"quotes\" & <tags>."},
    {"role": "user", "content": "Hi there"},
    {"role": "assistant", "content": "Hello!"},
    {"role": "user", "content": "Naïve café?"},
]


@pytest.mark.parametrize("source", [CHATML, LLAMA2, FANCY], ids=["chatml", "llama2", "namespace-tojson"])
def test_renders_like_transformers(source: str) -> None:
    ours = ChatTemplate(source, bos_token="<s>", eos_token="</s>").render(CONVERSATION)
    (theirs,), _ = render_jinja_template([CONVERSATION], chat_template=source, add_generation_prompt=True,
                                         bos_token="<s>", eos_token="</s>")
    assert ours == theirs
    assert "Naïve café?" in ours


def test_raise_exception_becomes_invalid_request() -> None:
    template = ChatTemplate(LLAMA2, bos_token="<s>", eos_token="</s>")
    with pytest.raises(InvalidRequest, match="roles must alternate"):
        template.render([{"role": "user", "content": "a"}, {"role": "user", "content": "b"}])


def test_sandbox_refuses_reaching_python_internals() -> None:
    template = ChatTemplate("{{ messages.__class__.__mro__[1].__subclasses__() }}")
    with pytest.raises(InvalidRequest):
        template.render([{"role": "user", "content": "x"}])


def test_template_that_does_not_compile_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match="does not compile"):
        ChatTemplate("{% for m in messages %}", origin="broken.jinja")


def test_fallback_template_text() -> None:
    messages = [{"role": "system", "content": "S"}, {"role": "user", "content": "U"}]
    assert ChatTemplate.fallback().render(messages) == "system: S\nuser: U\nassistant:"
    assert ChatTemplate.fallback().render(messages, add_generation_prompt=False) == "system: S\nuser: U\n"


def _model_dir(tmp_path: Path, config: dict[str, object], jinja: str | None = None) -> Path:
    tmp_path.mkdir(parents=True, exist_ok=True)
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(config))
    if jinja is not None:
        (tmp_path / "chat_template.jinja").write_text(jinja)
    return tmp_path


def test_from_model_directory(tmp_path: Path) -> None:
    model = _model_dir(tmp_path, {"chat_template": CHATML, "bos_token": {"content": "<s>", "lstrip": False},
                                  "eos_token": "</s>"})
    template = ChatTemplate.from_path(model)
    assert template is not None
    assert (template.bos_token, template.eos_token) == ("<s>", "</s>")  # AddedToken dicts unwrapped
    assert template.render([{"role": "user", "content": "Hi"}]) == "<s><|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
    assert ChatTemplate.from_path(model / "tokenizer_config.json") == template


def test_chat_template_jinja_file_wins_and_named_templates_pick_default(tmp_path: Path) -> None:
    model = _model_dir(tmp_path / "a", {"chat_template": CHATML}, jinja="J:{{ messages[0]['content'] }}")
    assert ChatTemplate.from_path(model).render([{"role": "user", "content": "x"}]) == "J:x"  # type: ignore[union-attr]
    named = [{"name": "tool_use", "template": "T"}, {"name": "default", "template": "D{{ messages | length }}"}]
    model = _model_dir(tmp_path / "b", {"chat_template": named})
    assert ChatTemplate.from_path(model).render([{"role": "user", "content": "x"}]) == "D1"  # type: ignore[union-attr]


def _group(template: str = "", **fields: str) -> GroupLoad:
    return GroupLoad(name="g", tp=1, model="/srv/chat", kv_dtype="none", kv_capacity_tokens=0, kv_used_tokens=0,
                     running=0, waiting=0, queue_depth=0, leader_pid=1, host="h", max_context=64, vocab_size=256,
                     served_models=["chat"], chat_template=template, **fields)  # type: ignore[arg-type]


def test_template_source_prefers_explicit_then_the_published_template_and_never_falls_back(tmp_path: Path) -> None:
    model = _model_dir(tmp_path / "model", {"chat_template": CHATML})
    plain = _model_dir(tmp_path / "plain", {"bos_token": "<s>"})  # a model without a template
    messages = [{"role": "user", "content": "Hi"}]
    published = {template_digest(CHATML): CHATML}
    reads: list[str] = []

    def read(digest: str) -> str | None:
        reads.append(digest)
        return published.get(digest)

    source = TemplateSource()
    group = _group(template_digest(CHATML), bos_token="<s>")
    assert source.for_group(group, read).render(messages) == "<s><|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
    assert source.for_group(group, read) is source.cached(group) and len(reads) == 1  # read once per digest
    with pytest.raises(InvalidRequest, match="model 'chat' has no chat template"):
        source.for_group(_group(""), read)  # never the plain template in its place
    with pytest.raises(Unavailable, match="not in Redis"):
        source.for_group(_group(template_digest("gone")), read)
    explicit = TemplateSource(model)
    assert explicit.for_group(_group(""), read).render(messages).startswith("<|im_start|>user")
    with pytest.raises(ConfigError, match="has no chat template"):
        TemplateSource(plain)
    with pytest.raises(ConfigError):
        TemplateSource(tmp_path / "missing")


def test_normalize_messages() -> None:
    parts = [{"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]},
             {"role": "assistant", "content": None, "name": "bot"}]
    assert normalize_messages(parts) == [{"role": "user", "content": "ab"},
                                         {"role": "assistant", "content": "", "name": "bot"}]
    bad = [
        [],
        "hello",
        [{"role": "wizard", "content": "x"}],
        [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}],
        [{"role": "user", "content": 5}],
        [{"role": "assistant", "content": "", "tool_calls": [{"id": "1"}]}],
        ["not an object"],
    ]
    for messages in bad:
        with pytest.raises(InvalidRequest, match="field 'messages'"):
            normalize_messages(messages)
