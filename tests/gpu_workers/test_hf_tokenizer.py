"""load_tokenizer: a model directory's tokenizer.json against transformers' AutoTokenizer, the
special token ids from the config files, and the byte-level fallback."""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from transformers import AutoTokenizer, PreTrainedTokenizerFast

from broker.errors import ConfigError
from gpu_workers.hf_tokenizer import HFTokenizer, load_tokenizer
from gpu_workers.tokenizer import ByteTokenizer
from tests.gpu_workers import tokenizer_fixtures as fixtures

logging.getLogger("transformers").setLevel(logging.ERROR)

SAMPLES = [
    "",
    " ",
    "Hello world",
    "  two leading spaces, trailing  ",
    "Héllo 日本語 🦀👨\u200d👩\u200d👧\n\tend",
    "<s>written</s> special <|im_end|> tokens <|begin_of_text|>",
    "a\u0301 ǅ \U0001d518 \u00a0nbsp",
]


def write(directory: Path, **files: Any) -> Path:
    """Write files named by keyword (``tokenizer_config`` -> tokenizer_config.json); str as is."""
    directory.mkdir(parents=True, exist_ok=True)
    for name, content in files.items():
        text = content if isinstance(content, str) else json.dumps(content)
        (directory / f"{name}.json").write_text(text, encoding="utf-8")
    return directory


# name -> (tokenizer.json, tokenizer_config.json, how many special ids encode adds in front)
MODELS = {
    # Qwen2 / GPT-2: a ByteLevel post-processor adds nothing.
    "byte-level": (fixtures.byte_level_json(), {"tokenizer_class": "PreTrainedTokenizerFast",
                                                "bos_token": None, "eos_token": "<|im_end|>"}, 0),
    # Llama 3: the post-processor adds <|begin_of_text|>.
    "llama3": (fixtures.byte_level_json(bos_template=True), {"tokenizer_class": "PreTrainedTokenizerFast",
               "bos_token": "<|begin_of_text|>", "eos_token": "<|endoftext|>"}, 1),
    # Llama 2 / Mistral as a transformers 4 checkpoint writes them; add_bos_token agrees with the file.
    "llama2": (fixtures.sentencepiece_json(), {"tokenizer_class": "LlamaTokenizer", "add_bos_token": True,
               "add_eos_token": False, "bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>",
               "legacy": False}, 1),
    # (Not as LlamaTokenizer: transformers 5 would swap in that class's own decoder chain.)
    "metaspace-decoder": (fixtures.sentencepiece_json(decoder="metaspace"), {
        "tokenizer_class": "PreTrainedTokenizerFast", "add_bos_token": True, "bos_token": "<s>",
        "eos_token": {"content": "</s>", "special": True, "__type": "AddedToken"}, "unk_token": "<unk>"}, 1),
    # transformers 5 ignores add_bos_token/add_eos_token when there is a tokenizer.json: the file's
    # post-processor decides, even against the flags.
    "flags-against-file": (fixtures.byte_level_json(bos_template=True), {
        "tokenizer_class": "PreTrainedTokenizerFast", "add_bos_token": False, "add_eos_token": True,
        "bos_token": "<|begin_of_text|>", "eos_token": "<|endoftext|>"}, 1),
    "flags-without-post-processor": (fixtures.sentencepiece_json(bos_template=False), {
        "tokenizer_class": "PreTrainedTokenizerFast", "add_bos_token": True, "bos_token": "<s>",
        "eos_token": "</s>"}, 0),
}


Loader = Callable[[str], tuple[Any, HFTokenizer]]


@pytest.fixture(scope="module")
def loaded(tmp_path_factory: pytest.TempPathFactory) -> Loader:
    """(transformers' AutoTokenizer, ours) for a model of MODELS, each directory written once."""
    cache: dict[str, tuple[Any, HFTokenizer]] = {}

    def load(name: str) -> tuple[Any, HFTokenizer]:
        if name not in cache:
            tokenizer_json, config, _ = MODELS[name]
            directory = write(tmp_path_factory.mktemp(name), tokenizer=tokenizer_json, tokenizer_config=config)
            ours = load_tokenizer(directory, vocab_size=1000).tokenizer
            assert isinstance(ours, HFTokenizer)
            cache[name] = (AutoTokenizer.from_pretrained(str(directory)), ours)
        return cache[name]

    return load


def transformers_ids(auto: Any, text: str) -> list[int]:
    """transformers' ids for ``text``, less a BOS its post-processor puts in front of a text that
    starts with it already (transformers would give two; ours, like apply_chat_template, one)."""
    ids = auto(text)["input_ids"]
    bos = auto.bos_token_id
    return ids[1:] if bos is not None and text.startswith(auto.bos_token) and ids[:2] == [bos, bos] else ids


@pytest.mark.parametrize("name", sorted(MODELS))
def test_encode_and_decode_match_autotokenizer(loaded: Loader, name: str) -> None:
    auto, ours = loaded(name)
    for text in SAMPLES:
        expected = transformers_ids(auto, text)
        assert ours.encode(text) == expected, text
        assert ours.decode(expected) == auto.decode(expected, skip_special_tokens=True), text
    added = MODELS[name][2]
    specials = set(auto.all_special_ids)
    ids = ours.encode("x y")
    assert [i in specials for i in ids] == [True] * added + [False] * (len(ids) - added)


@settings(max_examples=60, deadline=None)
@given(name=st.sampled_from(sorted(MODELS)), text=st.text(st.characters(blacklist_categories=("Cs",)), max_size=40))
def test_encode_and_decode_match_autotokenizer_on_any_text(loaded: Loader, name: str, text: str) -> None:
    auto, ours = loaded(name)
    expected = transformers_ids(auto, text)
    assert ours.encode(text) == expected
    assert ours.decode(expected) == auto.decode(expected, skip_special_tokens=True)


@pytest.mark.parametrize("name", ["llama3", "llama2", "byte-level"])
def test_a_prompt_that_starts_with_bos_gets_no_second_one(loaded: Loader, name: str) -> None:
    """A chat template renders its BOS into the prompt: the ids are apply_chat_template's, one BOS."""
    auto, ours = loaded(name)
    messages = [{"role": "user", "content": "hi there"}]
    auto.chat_template = "{{ bos_token }}{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
    rendered = auto.apply_chat_template(messages, tokenize=False)
    expected = auto.apply_chat_template(messages, tokenize=True, return_dict=True)["input_ids"]
    assert ours.encode(rendered) == expected
    bos = auto.bos_token_id
    assert bos is None or expected.count(bos) == 1
    assert ours.encode(rendered) != auto(rendered)["input_ids"] or MODELS[name][2] == 0  # transformers: two


def test_matches_a_tokenizer_saved_by_transformers(tmp_path: Path) -> None:
    backend = fixtures.backend(fixtures.sentencepiece_json(bos_template=False))
    PreTrainedTokenizerFast(
        tokenizer_object=backend, bos_token="<s>", eos_token="</s>", unk_token="<unk>", add_bos_token=True
    ).save_pretrained(tmp_path)
    auto, ours = AutoTokenizer.from_pretrained(str(tmp_path)), load_tokenizer(tmp_path, vocab_size=1000)
    for text in SAMPLES:
        assert ours.tokenizer.encode(text) == transformers_ids(auto, text)
    assert ours.tokenizer.encode("hi")[0] == ours.bos_token_id == 1
    assert ours.eos_token_ids == {2}


def test_decode_skips_special_tokens_and_ids_the_vocabulary_lacks(tmp_path: Path) -> None:
    directory = write(tmp_path, tokenizer=fixtures.byte_level_json(), tokenizer_config={"eos_token": "<|im_end|>"})
    tok = load_tokenizer(directory, vocab_size=1000).tokenizer
    ids = tok.encode("hi<|im_end|>there")
    im_end = ids[2]
    assert ids == [*tok.encode("hi"), im_end, *tok.encode("there")]
    assert tok.decode(ids) == "hithere"
    assert tok.decode([*tok.encode("a"), 999, 2**40, -1, *tok.encode("b")]) == "ab"


# --- special tokens and chat template -------------------------------------------------------------

def sp_dir(tmp_path: Path, **files: Any) -> Path:
    files.setdefault("tokenizer_config", {"bos_token": "<s>", "eos_token": "</s>"})
    return write(tmp_path, tokenizer=fixtures.sentencepiece_json(), **files)


def test_eos_is_the_union_of_generation_config_config_and_the_tokenizer(tmp_path: Path) -> None:
    loaded = load_tokenizer(sp_dir(tmp_path, generation_config={"eos_token_id": 7}, config={"eos_token_id": 9}),
                            vocab_size=1000)
    assert loaded.eos_token_ids == {7, 9, 2}  # 2: tokenizer_config.json's eos_token "</s>"
    assert (loaded.bos_token, loaded.eos_token) == ("<s>", "</s>")


@pytest.mark.parametrize("generation", [{"eos_token_id": 0}, {"eos_token_id": [0, 1]}, {}])
@pytest.mark.parametrize("eos_token", ["<|im_end|>", {"content": "<|im_end|>", "special": True}])
def test_a_chat_models_end_of_turn_ends_generation_whatever_generation_config_says(
        tmp_path: Path, generation: dict[str, Any], eos_token: Any) -> None:
    """The issue's failing input: a chat model copy whose generation_config.json names only the
    pretraining EOS (0) while the tokenizer's EOS is <|im_end|> must stop at the end of a turn."""
    directory = write(tmp_path, tokenizer=fixtures.byte_level_json(), generation_config=generation,
                      tokenizer_config={"eos_token": eos_token, "bos_token": None})
    loaded = load_tokenizer(directory, vocab_size=1000)
    im_end = loaded.tokenizer.token_to_id("<|im_end|>")  # type: ignore[attr-defined]
    assert im_end is not None and im_end in loaded.eos_token_ids
    given = generation.get("eos_token_id", [])
    assert set(given if isinstance(given, list) else [given]) <= loaded.eos_token_ids


def test_eos_from_generation_config_list(tmp_path: Path) -> None:
    loaded = load_tokenizer(sp_dir(tmp_path, generation_config={"eos_token_id": [2, 300, 301], "bos_token_id": 1}),
                            vocab_size=1000)
    assert loaded.eos_token_ids == {2, 300, 301}
    assert loaded.bos_token_id == 1  # the BOS is the first one given (generation_config.json first)


def test_eos_and_bos_from_config_json_without_generation_config(tmp_path: Path) -> None:
    loaded = load_tokenizer(sp_dir(tmp_path, config={"eos_token_id": [5, 6], "bos_token_id": 4}), vocab_size=1000)
    assert loaded.eos_token_ids == {5, 6, 2}
    assert loaded.bos_token_id == 4


def test_eos_and_bos_from_tokenizer_config_tokens_last(tmp_path: Path) -> None:
    # A null id in the model configs counts as absent; the AddedToken dict form is read too.
    directory = sp_dir(
        tmp_path,
        generation_config={"eos_token_id": None},
        config={"bos_token_id": None},
        tokenizer_config={"bos_token": {"content": "<s>", "special": True}, "eos_token": "</s>"},
    )
    loaded = load_tokenizer(directory, vocab_size=1000)
    assert loaded.eos_token_ids == {2}
    assert loaded.bos_token_id == 1


def test_no_special_tokens_anywhere(tmp_path: Path) -> None:
    loaded = load_tokenizer(sp_dir(tmp_path, tokenizer_config={"eos_token": "<not-in-vocab>"}), vocab_size=1000)
    assert loaded.eos_token_ids == frozenset()
    assert loaded.bos_token_id is None
    assert loaded.chat_template is None


def test_chat_template_from_tokenizer_config(tmp_path: Path) -> None:
    template = "{% for m in messages %}{{ m['content'] }}{% endfor %}"
    loaded = load_tokenizer(sp_dir(tmp_path, tokenizer_config={"chat_template": template}), vocab_size=1000)
    assert loaded.chat_template == template


def test_chat_template_named_list_takes_default(tmp_path: Path) -> None:
    templates = [{"name": "tool_use", "template": "T"}, {"name": "default", "template": "D"}]
    loaded = load_tokenizer(sp_dir(tmp_path, tokenizer_config={"chat_template": templates}), vocab_size=1000)
    assert loaded.chat_template == "D"


def test_chat_template_jinja_file_wins(tmp_path: Path) -> None:
    directory = sp_dir(tmp_path, tokenizer_config={"chat_template": "old"})
    (directory / "chat_template.jinja").write_text("{{ messages }}", encoding="utf-8")
    assert load_tokenizer(directory, vocab_size=1000).chat_template == "{{ messages }}"


# --- fallback and errors ---------------------------------------------------------------------------

def test_without_tokenizer_json_bytes_are_tokens(tmp_path: Path) -> None:
    directory = write(tmp_path, config={"eos_token_id": 511, "vocab_size": 512},
                      generation_config={"eos_token_id": 511})
    loaded = load_tokenizer(directory, vocab_size=512)
    assert isinstance(loaded.tokenizer, ByteTokenizer)
    assert loaded.tokenizer.vocab_size == 512
    assert loaded.tokenizer.encode("hé") == [104, 0xC3, 0xA9]
    assert loaded.tokenizer.decode([104, 512, 105]) == "hi"  # outside the vocabulary
    assert loaded.eos_token_ids == {511}


def test_an_empty_directory_still_loads(tmp_path: Path) -> None:
    loaded = load_tokenizer(tmp_path, vocab_size=256)
    assert isinstance(loaded.tokenizer, ByteTokenizer)
    assert loaded.eos_token_ids == frozenset() and loaded.bos_token_id is None


def test_a_tokenizer_larger_than_the_model_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="only 100 embeddings"):
        load_tokenizer(sp_dir(tmp_path), vocab_size=100)


@pytest.mark.parametrize(
    ("name", "content", "message"),
    [
        ("tokenizer", "{not json", "unreadable tokenizer.json"),
        ("tokenizer_config", "[1, 2]", "not a JSON object"),
        ("generation_config", "{", "unreadable JSON"),
    ],
)
def test_broken_files_are_config_errors(tmp_path: Path, name: str, content: str, message: str) -> None:
    directory = sp_dir(tmp_path)
    (directory / f"{name}.json").write_text(content, encoding="utf-8")
    with pytest.raises(ConfigError, match=message):
        load_tokenizer(directory, vocab_size=1000)
