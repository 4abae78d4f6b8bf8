"""Chat messages -> one prompt: the model's Jinja chat template, as its groups publish it.

A Hugging Face model directory carries its template in ``tokenizer_config.json`` (``chat_template``,
a string or a list of named templates) or, in newer exports, in ``chat_template.jinja``; the worker
groups serving it publish it in the registry (broker.chat), where clients read it. It is rendered the way ``transformers`` renders it: a sandboxed Jinja environment with ``trim_blocks`` and
``lstrip_blocks``, the variables ``messages``, ``add_generation_prompt``, ``bos_token`` and
``eos_token``, and the helpers ``raise_exception`` and ``strftime_now``. Templates come from model
repositories, so they are untrusted code: the sandbox is not optional.

Models without a tokenizer of their own (``echo``, ``random:<preset>``) publish ``FALLBACK_TEMPLATE``
(broker.chat's plain template): one ``<role>: <content>`` line per message, then ``assistant:`` for
the model to continue::

    system: You are terse.
    user: Hello!
    assistant:

The rendered prompt contains the template's ``bos_token`` when the template writes it; the worker's
tokenizer then does not put a second one in front (``gpu_workers.hf_tokenizer``), so the ids are
those of ``transformers``' ``apply_chat_template``.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import jinja2
import jinja2.ext
import jinja2.nodes
from jinja2.sandbox import ImmutableSandboxedEnvironment
from redis import Redis
from redis.asyncio import Redis as AsyncRedis

from balancer.models import resolve_model
from broker.chat import PLAIN_CHAT_TEMPLATE, read_template, template_text
from broker.errors import ConfigError, InvalidRequest, ModelNotFound, Unavailable
from broker.keys import Keys
from broker.registry import GroupLoad, GroupStatus, read_groups, read_groups_async
from broker.settings import Settings

FALLBACK_TEMPLATE = PLAIN_CHAT_TEMPLATE
ROLES = frozenset({"system", "developer", "user", "assistant", "tool"})


class _GenerationTag(jinja2.ext.Extension):
    """``{% generation %}...{% endgeneration %}`` (marks assistant text for training): rendered as is."""

    def __init__(self, environment: jinja2.Environment) -> None:
        super().__init__(environment)
        self.tags = {"generation"}  # jinja2 declares it per instance

    def parse(self, parser: Any) -> jinja2.nodes.Node:
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return jinja2.nodes.CallBlock(self.call_method("_render"), [], [], body).set_lineno(lineno)

    def _render(self, caller: Any) -> str:
        return str(caller())


def _raise_exception(message: str) -> None:
    raise jinja2.exceptions.TemplateError(message)


def _tojson(value: Any, ensure_ascii: bool = False, indent: int | None = None,
            separators: tuple[str, str] | None = None, sort_keys: bool = False) -> str:
    # Jinja's own tojson escapes HTML characters, which would change the prompt.
    return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _environment() -> ImmutableSandboxedEnvironment:
    env = ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[_GenerationTag, jinja2.ext.loopcontrols]
    )
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    return env


def _token_text(value: Any) -> str:
    """A special token as tokenizer_config.json stores it: a string, or an AddedToken dict."""
    if isinstance(value, str):
        return value
    if isinstance(value, Mapping) and isinstance(value.get("content"), str):
        return value["content"]
    return ""


def _pick_template(value: Any) -> str | None:
    """``chat_template`` is a string, or a list of ``{"name", "template"}``: take "default"."""
    if isinstance(value, str):
        return value
    if isinstance(value, list):
        named = {t.get("name"): t.get("template") for t in value if isinstance(t, Mapping)}
        chosen = named.get("default")
        return chosen if isinstance(chosen, str) else None
    return None


@dataclass(frozen=True)
class ChatTemplate:
    """A compiled chat template and the special tokens it may refer to."""

    source: str
    bos_token: str = ""
    eos_token: str = ""
    origin: str = field(default="fallback", compare=False)  # where it came from, for messages

    def __post_init__(self) -> None:
        try:
            compiled = _environment().from_string(self.source)
        except jinja2.exceptions.TemplateError as exc:
            raise ConfigError(f"chat template from {self.origin} does not compile: {exc}") from None
        object.__setattr__(self, "_compiled", compiled)

    @classmethod
    def fallback(cls) -> ChatTemplate:
        return cls(FALLBACK_TEMPLATE)

    @classmethod
    def from_path(cls, path: str | Path) -> ChatTemplate | None:
        """The template of a model directory, a GGUF file (its metadata's), a tokenizer_config.json, or a
        Jinja file; None if it has none."""
        path = Path(path)
        if _is_gguf(path):
            from gpu_workers.model.loader import resolve_model  # the GGUF's metadata, as a model directory

            path = resolve_model(str(path))
        if path.is_dir():
            config = _read_config(path / "tokenizer_config.json")
            jinja_file = path / "chat_template.jinja"
            source = jinja_file.read_text(encoding="utf-8") if jinja_file.is_file() else None
            source = source or _pick_template(config.get("chat_template"))
        elif path.suffix == ".json":
            config = _read_config(path)
            source = _pick_template(config.get("chat_template"))
        elif path.is_file():
            config, source = {}, path.read_text(encoding="utf-8")
        else:
            raise ConfigError(f"chat template: {path} is neither a model directory nor a file")
        if not source:
            return None
        return cls(source, _token_text(config.get("bos_token")), _token_text(config.get("eos_token")),
                   origin=str(path))

    def render(self, messages: Sequence[Mapping[str, Any]], *, add_generation_prompt: bool = True) -> str:
        """The prompt for ``messages``; InvalidRequest when the template refuses them."""
        try:
            return str(self._compiled.render(  # type: ignore[attr-defined]
                messages=[dict(m) for m in messages],
                add_generation_prompt=add_generation_prompt,
                bos_token=self.bos_token,
                eos_token=self.eos_token,
            ))
        except jinja2.exceptions.TemplateError as exc:
            raise InvalidRequest(f"field 'messages': the chat template refused them: {exc}") from None
        except (TypeError, ValueError, KeyError, AttributeError) as exc:
            raise InvalidRequest(f"field 'messages': the chat template failed on them: {exc}") from None


def _read_config(path: Path) -> dict[str, Any]:
    if not path.is_file():
        return {}
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise ConfigError(f"cannot read {path}: {exc}") from None
    return config if isinstance(config, dict) else {}


def normalize_messages(messages: Any) -> list[dict[str, Any]]:
    """OpenAI-style messages checked and flattened: ``content`` as text (text parts joined).

    InvalidRequest names what is wrong; tool calls and non-text parts are not supported.
    """
    if not isinstance(messages, list) or not messages:
        raise InvalidRequest("field 'messages': expected a non-empty array of messages")
    out = []
    for i, message in enumerate(messages):
        if not isinstance(message, Mapping):
            raise InvalidRequest(f"field 'messages': item {i} is not an object")
        role = message.get("role")
        if role not in ROLES:
            raise InvalidRequest(f"field 'messages': item {i} has role {role!r}; expected one of {sorted(ROLES)}")
        content = message.get("content")
        if isinstance(content, list):
            texts = []
            for part in content:
                if not isinstance(part, Mapping) or part.get("type") != "text" or not isinstance(part.get("text"), str):
                    raise InvalidRequest(f"field 'messages': item {i} has a content part that is not text")
                texts.append(part["text"])
            content = "".join(texts)
        elif content is None:
            content = ""
        elif not isinstance(content, str):
            raise InvalidRequest(f"field 'messages': item {i} has content that is neither text nor parts")
        if message.get("tool_calls"):
            raise InvalidRequest(f"field 'messages': item {i} has tool_calls, which this server does not support")
        entry: dict[str, Any] = {"role": role, "content": content}
        if isinstance(message.get("name"), str):
            entry["name"] = message["name"]
        out.append(entry)
    return out


def _is_gguf(path: Path) -> bool:
    try:
        with path.open("rb") as f:
            return f.read(4) == b"GGUF"
    except OSError:
        return False


class TemplateSource:
    """Which template serves a model: an explicit one, else the one its groups publish (broker.chat).

    ``explicit`` (``--chat-template``/``--model-dir``) wins for every model. Otherwise the template
    is the one a group of the model publishes in the registry, read once per digest; a model that
    publishes none gets an error, never a silent fallback (the prompt would not be the model's).
    """

    def __init__(self, explicit: str | Path | None = None) -> None:
        self._explicit = None
        if explicit is not None:
            self._explicit = ChatTemplate.from_path(explicit)
            if self._explicit is None:
                raise ConfigError(f"{explicit} has no chat template (tokenizer_config.json chat_template "
                                  "or chat_template.jinja)")
        self._by_digest: dict[tuple[str, str, str], ChatTemplate] = {}

    @property
    def explicit(self) -> ChatTemplate | None:
        return self._explicit

    def cached(self, group: GroupLoad) -> ChatTemplate | None:
        """The template for ``group``'s model when no Redis read is needed (explicit, or read before)."""
        return self._explicit or self._by_digest.get(_card(group))

    def for_group(self, group: GroupLoad, read: Callable[[str], str | None]) -> ChatTemplate:
        """The template for the model ``group`` serves; ``read(digest)`` fetches a published source.

        Raises InvalidRequest when the model publishes no template, Unavailable when its template is
        not in Redis (a Redis restarted without persistence, until the group registers again).
        """
        if (template := self.cached(group)) is not None:
            return template
        model = group.served_models[0] if group.served_models else group.model
        if not group.chat_template:
            raise InvalidRequest(f"model {model!r} has no chat template (neither chat_template.jinja nor "
                                 "tokenizer_config.json's chat_template): send a prompt instead")
        source = read(group.chat_template)
        if source is None:
            raise Unavailable(f"the chat template of model {model!r} ({group.chat_template[:12]}) is not in Redis")
        template = ChatTemplate(source, group.bos_token, group.eos_token,
                                origin=f"model {model!r} (template {group.chat_template[:12]})")
        self._by_digest[_card(group)] = template
        return template


def _card(group: GroupLoad) -> tuple[str, str, str]:
    return (group.chat_template, group.bos_token, group.eos_token)


def registry_template(redis: Redis, keys: Keys, groups: Sequence[GroupLoad], model: str, *,
                      source: TemplateSource | None = None) -> ChatTemplate:
    """The chat template of ``model`` as its groups publish it (the first that serves it);
    ModelNotFound when none does, and TemplateSource.for_group's errors."""
    group = next((g for g in groups if g.serves(model)), None)
    if group is None:
        raise ModelNotFound(f"model {model!r} is not served here")
    return (source or TemplateSource()).for_group(group, lambda digest: read_template(redis, keys, digest))


def chat_group(groups: Sequence[GroupStatus], model: str | None, settings: Settings) -> GroupStatus:
    """A group (a live one if there is one) of the model a chat request goes to: ``model``, else the
    only one served, else the balancers' default (balancer.models' rule). Unavailable when no group
    is registered, ModelNotFound / InvalidRequest as ``resolve_model``."""
    name = resolve_model(model, groups, default=settings.default_model)
    if name is None:
        raise Unavailable("no worker group is registered: no chat template to render with")
    return min((g for g in groups if g.serves(name)), key=lambda g: (not g.alive, g.name))


def render_chat(redis: Redis, keys: Keys, settings: Settings, messages: Sequence[Mapping[str, Any]], *,
                model: str | None, source: TemplateSource) -> str:
    """The prompt for ``messages`` with the template ``model``'s groups publish (see ``chat_group``)."""
    group = chat_group(read_groups(redis, keys, dead_after_s=settings.dead_after_s), model, settings)
    return source.for_group(group, lambda digest: read_template(redis, keys, digest)).render(
        normalize_messages(list(messages)))


async def render_chat_async(redis: AsyncRedis, keys: Keys, settings: Settings, messages: Sequence[Mapping[str, Any]], *,
                            model: str | None, source: TemplateSource) -> str:
    """``render_chat`` on an asyncio Redis client."""
    group = chat_group(await read_groups_async(redis, keys, dead_after_s=settings.dead_after_s), model, settings)
    template = source.cached(group)
    if template is None:
        raw = await redis.get(keys.chat_template(group.chat_template)) if group.chat_template else None
        template = source.for_group(group, lambda digest: template_text(raw, digest))
    return template.render(normalize_messages(list(messages)))
