"""A model directory's tokenizer, with the special tokens the engine needs.

``tokenizer.json`` runs in the ``tokenizers`` library, as transformers' ``AutoTokenizer`` runs it:
encoding adds the special tokens of its post-processor (Llama 2's and Llama 3's put a BOS in
front), decoding skips special tokens. Like transformers 5, ``add_bos_token``/``add_eos_token``
in tokenizer_config.json are ignored when a tokenizer.json exists. (transformers 5's
model-specific classes, e.g. ``LlamaTokenizer``, rebuild the pre-tokenizer from their own code
rather than the file; where the two differ, as for Llama 2's leading spaces, the file is what
the model was trained with and wins here.) A directory without tokenizer.json (``random:<preset>``
models) gets the byte-level ``ByteTokenizer``. transformers is not needed at serving time.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeGuard

import tokenizers

from broker.errors import ConfigError
from gpu_workers.engine import Tokenizer
from gpu_workers.tokenizer import ByteTokenizer

_U32_END = 1 << 32


@dataclass(frozen=True, slots=True)
class LoadedTokenizer:
    tokenizer: Tokenizer
    eos_token_ids: frozenset[int]  # generation ends at any of these
    bos_token_id: int | None
    chat_template: str | None  # the Jinja source, rendered by the chat endpoint
    # The special tokens' texts, as a chat template sees them (``bos_token``, ``eos_token``).
    bos_token: str = ""
    eos_token: str = ""


class HFTokenizer:
    """A ``tokenizers.Tokenizer`` behind the engine's ``Tokenizer`` protocol.

    ``encode`` adds what the post-processor adds and turns added tokens written in the text into
    their ids, as transformers does, except that a text already starting with the token the
    post-processor puts in front (a chat prompt rendered with its BOS) does not get it twice;
    ``decode`` drops special tokens (``skip_special_tokens=True``) and ids the vocabulary lacks (a
    model's padded embedding rows, a client's stray ids).
    """

    def __init__(self, backend: tokenizers.Tokenizer) -> None:
        self.backend = backend

    def encode(self, text: str, *, add_special_tokens: bool = True) -> list[int]:
        if not add_special_tokens:
            return list(self.backend.encode(text, add_special_tokens=False).ids)
        encoding = self.backend.encode(text, add_special_tokens=True)
        ids, added = encoding.ids, encoding.special_tokens_mask  # added: 1 where the post-processor put a token
        if len(ids) > 1 and added[0] and not added[1] and ids[0] == ids[1]:
            # The text starts with the token the post-processor puts in front (a rendered chat template
            # writes its BOS): one BOS, as transformers' apply_chat_template gives, not two.
            return ids[1:]
        return ids

    def decode(self, ids: list[int]) -> str:
        # The Rust side takes u32 ids and raises on larger ones; unknown smaller ones it skips.
        return self.backend.decode([i for i in ids if 0 <= i < _U32_END], skip_special_tokens=True)

    def token_to_id(self, token: str) -> int | None:
        return self.backend.token_to_id(token)


def load_tokenizer(model_dir: Path, *, vocab_size: int) -> LoadedTokenizer:
    """The tokenizer of ``model_dir`` (a model with ``vocab_size`` embeddings) and its special tokens.

    EOS ids are the union of generation_config.json's ``eos_token_id`` (an int or a list),
    config.json's, and the id of tokenizer_config.json's ``eos_token``: a chat model's end of turn
    (``<|im_end|>``, ``<|eot_id|>``) is often only the tokenizer's EOS, while generation_config.json
    names the pretraining ``<|endoftext|>``; transformers' chat usage (the Llama 3 and Qwen model
    cards pass both to ``generate``) and vLLM (tokenizer EOS plus generation_config's ids as stop
    tokens) stop at either. The BOS id is the first one given, in that order. The chat template is
    chat_template.jinja or tokenizer_config.json's ``chat_template``.
    """
    model_dir = Path(model_dir)
    config = _json_object(model_dir / "tokenizer_config.json")
    path = model_dir / "tokenizer.json"
    token_to_id: Callable[[str], int | None]
    if path.is_file():
        try:
            backend = tokenizers.Tokenizer.from_file(str(path))
        except Exception as e:  # noqa: BLE001 - the Rust side raises plain Exception for any parse error
            raise ConfigError(f"{path}: unreadable tokenizer.json: {e}") from None
        base = backend.get_vocab_size(with_added_tokens=False)
        if base > vocab_size:
            raise ConfigError(f"{path}: {base} tokens, but the model has only {vocab_size} embeddings")
        tokenizer: Tokenizer | None = HFTokenizer(backend)
        token_to_id = backend.token_to_id
    else:
        tokenizer = None
        token_to_id = _no_token_ids

    configs = [_json_object(model_dir / "generation_config.json"), _json_object(model_dir / "config.json")]
    bos = _special_ids("bos", configs, config, token_to_id)
    eos = frozenset(_all_special_ids("eos", configs, config, token_to_id))
    if tokenizer is None:
        tokenizer = ByteTokenizer(vocab_size, specials=eos | frozenset(bos))
    return LoadedTokenizer(
        tokenizer=tokenizer,
        eos_token_ids=eos,
        bos_token_id=bos[0] if bos else None,
        chat_template=_chat_template(model_dir, config),
        bos_token=_token_text(config.get("bos_token")) or "",
        eos_token=_token_text(config.get("eos_token")) or "",
    )


def _special_ids(
    kind: str,
    configs: list[dict[str, Any]],
    tokenizer_config: dict[str, Any],
    token_to_id: Callable[[str], int | None],
) -> list[int]:
    """``{kind}_token_id`` (an int or a list) of the first of ``configs`` that has one, else the id
    of tokenizer_config.json's ``{kind}_token``; [] when none says."""
    for source in configs:
        value = source.get(f"{kind}_token_id")
        ids = [v for v in (value if isinstance(value, list) else [value]) if _is_token_id(v)]
        if ids:
            return ids
    token = _token_text(tokenizer_config.get(f"{kind}_token"))
    token_id = token_to_id(token) if token is not None else None
    return [token_id] if token_id is not None else []


def _all_special_ids(
    kind: str,
    configs: list[dict[str, Any]],
    tokenizer_config: dict[str, Any],
    token_to_id: Callable[[str], int | None],
) -> list[int]:
    """Every ``{kind}_token_id`` of ``configs`` (ints or lists) and the id of tokenizer_config.json's
    ``{kind}_token``, each once."""
    ids: list[int] = []
    for source in configs:
        value = source.get(f"{kind}_token_id")
        ids += [v for v in (value if isinstance(value, list) else [value]) if _is_token_id(v)]
    token = _token_text(tokenizer_config.get(f"{kind}_token"))
    token_id = token_to_id(token) if token is not None else None
    if token_id is not None:
        ids.append(token_id)
    return list(dict.fromkeys(ids))


def _chat_template(model_dir: Path, config: dict[str, Any]) -> str | None:
    """chat_template.jinja (how transformers 5 saves it), else tokenizer_config.json's entry, which
    older checkpoints may write as a list of named templates (the "default" one is taken)."""
    jinja = model_dir / "chat_template.jinja"
    if jinja.is_file():
        return jinja.read_text(encoding="utf-8")
    template = config.get("chat_template")
    if isinstance(template, list):
        named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
        template = named.get("default", next(iter(named.values()), None))
    return template if isinstance(template, str) else None


def _token_text(value: Any) -> str | None:
    """A special token as tokenizer_config.json writes it: a string or an AddedToken dict."""
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) else None


def _is_token_id(value: object) -> TypeGuard[int]:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _no_token_ids(token: str) -> int | None:
    return None


def _json_object(path: Path) -> dict[str, Any]:
    """A JSON object file's contents; {} when the file does not exist."""
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return {}
    except (OSError, ValueError) as e:
        raise ConfigError(f"{path}: unreadable JSON: {e}") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: not a JSON object")
    return raw


def tokenizer_spec(tokenizer: Tokenizer) -> str | None:
    """``tokenizer`` as the registry stores it (broker.tokenizers), or None for a kind it cannot
    store. ``tokenizer_from_spec`` makes an equal one back."""
    if isinstance(tokenizer, HFTokenizer):
        return json.dumps({"kind": "tokenizers", "json": tokenizer.backend.to_str()})
    if isinstance(tokenizer, ByteTokenizer):
        return json.dumps({"kind": "bytes", "vocab_size": tokenizer.vocab_size, "specials": sorted(tokenizer.specials)})
    return None


def tokenizer_from_spec(spec: str) -> Tokenizer:
    """The tokenizer a registry entry describes; ConfigError for one it cannot read."""
    try:
        raw = json.loads(spec)
        if raw["kind"] == "tokenizers":
            return HFTokenizer(tokenizers.Tokenizer.from_str(raw["json"]))
        if raw["kind"] == "bytes":
            return ByteTokenizer(int(raw["vocab_size"]), specials=frozenset(int(i) for i in raw["specials"]))
    except Exception as exc:  # noqa: BLE001 - json, a missing key, tokenizers' own errors
        raise ConfigError(f"unreadable tokenizer in the registry ({type(exc).__name__})") from None
    raise ConfigError(f"unknown tokenizer kind {raw.get('kind')!r} in the registry")
