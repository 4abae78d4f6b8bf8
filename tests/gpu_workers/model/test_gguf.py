"""GGUF files as models: tensors, layouts and tokenizers against transformers' own GGUF loading of
the same small files (written here with gguf.GGUFWriter), tensor-parallel shards, and errors."""

from __future__ import annotations

import json
import random
from pathlib import Path

import numpy as np
import pytest
import torch

from broker.errors import ConfigError
from gpu_workers.hf_tokenizer import load_tokenizer
from gpu_workers.model.config import load_config
from gpu_workers.model.gguf_file import GGUFTensor, gguf_tensors, materialize_gguf, open_reader
from gpu_workers.model.layers import TPContext
from gpu_workers.model.llama import LlamaForCausalLM
from gpu_workers.model.loader import load_weights, resolve_model
from gpu_workers.model_runner import Chunk, ModelRunner
from tests.gpu_workers.model.gguf_files import gemma3_model, llama_model, vocab_size, write_gguf
from tests.gpu_workers.model.hf_models import assert_close, reference_logits

pytest.importorskip("gguf")
QUANTS = ["F32", "F16", "BF16", "Q8_0", "Q4_0", "Q4_1", "Q4_K", "Q6_K"]
TEXTS = ["The quick brown fox", "café naïve 日本語 🦀 1234567", "  leading spaces\n\nand\ttabs", "<|im_start|>user\nhi<|im_end|>"]


@pytest.fixture(autouse=True)
def _cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("RYZ_CACHE_DIR", str(tmp_path / "cache"))


def _hf_from_gguf(path: Path) -> torch.nn.Module:
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32).eval()


def _ours(path: Path, tp: TPContext | None = None) -> LlamaForCausalLM:
    model_dir = resolve_model(str(path))
    model = LlamaForCausalLM(load_config(model_dir), tp)
    load_weights(model, model_dir)
    return model


@pytest.mark.parametrize("quant", QUANTS)
def test_tensors_match_transformers_dequantized(quant: str, tmp_path: Path) -> None:
    """Every parameter, dequantized and un-permuted, equals what transformers loads from the file."""
    path = write_gguf(tmp_path / f"m-{quant}.gguf", llama_model(vocab=vocab_size()), quant=quant)
    reference = _hf_from_gguf(path).state_dict()
    model_dir = resolve_model(str(path))
    config = json.loads((model_dir / "config.json").read_text())
    wanted = [n for n in reference if not n.endswith("rotary_emb.inv_freq")]
    tensors = gguf_tensors(open_reader(path), config, wanted, source=path)
    assert sorted(tensors) == sorted(wanted)
    for name in wanted:
        assert torch.equal(tensors[name].load(), reference[name].float()), name


def test_biases_are_found_and_unpermuted_like_their_weights(tmp_path: Path) -> None:
    """Llama with attention and MLP biases (llama.cpp permutes q/k biases as their rows; transformers'
    GGUF loader ignores biases, so the reference is the model the F32 file was written from)."""
    source = llama_model(vocab=vocab_size(), bias=True)
    path = write_gguf(tmp_path / "b.gguf", source, quant="F32")
    model_dir = resolve_model(str(path))
    config = json.loads((model_dir / "config.json").read_text())
    assert config["attention_bias"] is True and config["mlp_bias"] is True
    reference = source.state_dict()
    wanted = [n for n in reference if not n.endswith("rotary_emb.inv_freq")]
    tensors = gguf_tensors(open_reader(path), config, wanted, source=path)
    for name in wanted:
        assert torch.equal(tensors[name].load(), reference[name].float()), name
    runner = ModelRunner(model_dir, num_blocks=16, block_size=8)
    prompt = [random.Random(2).randrange(vocab_size()) for _ in range(9)]
    logits = runner.run([Chunk(prompt, 0, [0, 1], True)])
    assert_close(logits[0], reference_logits(source, prompt)[-1], rel=1e-4, what="biased llama GGUF")


def test_logits_match_transformers_on_a_mixed_file(tmp_path: Path) -> None:
    """Q4_K attention, Q6_K down projection, Q8_0 embedding, Q4_0 the rest: the engine's logits
    (and greedy tokens) equal transformers' on the same file."""
    quant = {"token_embd.weight": "Q8_0", "output.weight": "Q6_K", "*": "Q4_0"}
    for layer in range(2):
        quant.update({f"blk.{layer}.attn_q.weight": "Q4_K", f"blk.{layer}.attn_k.weight": "Q4_K",
                      f"blk.{layer}.ffn_down.weight": "Q6_K", f"blk.{layer}.attn_v.weight": "Q4_1"})
    path = write_gguf(tmp_path / "mixed.gguf", llama_model(vocab=vocab_size()), quant=quant)
    hf = _hf_from_gguf(path)
    runner = ModelRunner(resolve_model(str(path)), num_blocks=16, block_size=8)
    prompt = [random.Random(1).randrange(vocab_size()) for _ in range(13)]
    logits = runner.run([Chunk(prompt, 0, [0, 1], True)])
    assert_close(logits[0], reference_logits(hf, prompt)[-1], rel=1e-4, what="mixed-quant GGUF")


@pytest.mark.parametrize("quant", ["Q4_K", "Q8_0", "F16"])
def test_each_rank_reads_its_shard(quant: str, tmp_path: Path) -> None:
    """Two ranks' q rows and down_proj columns, put together, are the whole tensors."""
    path = write_gguf(tmp_path / "m.gguf", llama_model(vocab=vocab_size()), quant=quant)
    whole = _ours(path)
    ranks = [_ours(path, TPContext(rank=r, size=2)) for r in range(2)]
    down = torch.cat([m.model.layers[1].mlp.down_proj.weight for m in ranks], dim=1)
    assert torch.equal(down, whole.model.layers[1].mlp.down_proj.weight)
    q = torch.cat([m.model.layers[0].self_attn.qkv_proj.weight[:128] for m in ranks])  # 2 q heads of 64 each
    assert torch.equal(q, whole.model.layers[0].self_attn.qkv_proj.weight[:256])


@pytest.mark.parametrize("quant", ["Q4_1", "Q6_K", "BF16", "F32"])
def test_narrow_reads_only_whole_blocks_and_keeps_the_part(quant: str, tmp_path: Path) -> None:
    """Narrowing rows (through the q permutation) and columns (block-aligned or not) equals
    narrowing the whole dequantized tensor."""
    path = write_gguf(tmp_path / "m.gguf", llama_model(vocab=vocab_size()), quant=quant)
    model_dir = resolve_model(str(path))
    config = json.loads((model_dir / "config.json").read_text())
    names = ["model.layers.0.self_attn.q_proj.weight", "model.layers.0.mlp.down_proj.weight"]
    tensors = gguf_tensors(open_reader(path), config, names + _rest(names, config), source=path)
    for name in names:
        lazy: GGUFTensor = tensors[name]
        full = lazy.load()
        for rows, cols in [((0, 64), (0, 256)), ((70, 33), (32, 64)), ((5, 1), (17, 100))]:
            part = lazy.narrow(0, *rows).narrow(1, *cols)
            assert part.shape == (rows[1], cols[1])
            assert torch.equal(part.load(), full[rows[0]:sum(rows), cols[0]:sum(cols)]), (name, rows, cols)
    with pytest.raises(ValueError):
        tensors[names[0]].narrow(0, 250, 10)


def _rest(names: list[str], config: dict) -> list[str]:
    """Every other checkpoint name of the model, so that gguf_tensors finds no unexpected tensor."""
    out = []
    for layer in range(config["num_hidden_layers"]):
        for part in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
                     "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj", "input_layernorm", "post_attention_layernorm"):
            out.append(f"model.layers.{layer}.{part}.weight")
    out += ["model.embed_tokens.weight", "model.norm.weight", "lm_head.weight"]
    return [n for n in out if n not in names]


def test_gemma3_names_and_norms_match_transformers(tmp_path: Path) -> None:
    """gemma3 files: every Hugging Face name (pre/post norms, q/k norms) maps to its GGUF tensor,
    norms stored as 1 + w come back as w, q/k rows are not permuted."""
    path = write_gguf(tmp_path / "g.gguf", gemma3_model(vocab=vocab_size("sentencepiece")), arch="gemma3",
                      quant={"*": "Q8_0", "blk.0.attn_q.weight": "Q4_K"}, tokenizer="sentencepiece")
    reference = _hf_from_gguf(path).state_dict()
    config = json.loads((materialize_gguf(path, cache_dir=tmp_path / "c") / "config.json").read_text())
    assert config["architectures"] == ["Gemma3ForCausalLM"] and config["tie_word_embeddings"] is True
    assert (config["head_dim"], config["sliding_window"], config["num_key_value_heads"]) == (64, 32, 1)
    wanted = [n for n in reference if n != "lm_head.weight"]
    tensors = gguf_tensors(open_reader(path), config, wanted, source=path)
    for name in wanted:
        assert torch.equal(tensors[name].load(), reference[name].float()), name


@pytest.mark.parametrize("kind", ["byte_level", "sentencepiece"])
def test_tokenizer_matches_transformers(kind: str, tmp_path: Path) -> None:
    """Encoding (special tokens and BOS included) and decoding as transformers' GGUF tokenizer."""
    from transformers import AutoTokenizer

    template = "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    path = write_gguf(tmp_path / "t.gguf", llama_model(vocab=vocab_size(kind), layers=1), tokenizer=kind,
                      chat_template=template)
    hf = AutoTokenizer.from_pretrained(tmp_path, gguf_file=path.name)
    loaded = load_tokenizer(resolve_model(str(path)), vocab_size=vocab_size(kind))
    for text in TEXTS:
        ids = hf(text)["input_ids"]
        assert loaded.tokenizer.encode(text) == ids, text
        assert loaded.tokenizer.decode(ids) == hf.decode(ids, skip_special_tokens=True), text
    assert loaded.chat_template == template
    assert loaded.bos_token_id == hf.bos_token_id
    assert loaded.eos_token_ids == {hf.eos_token_id}


def test_directory_is_cached_and_renewed_when_the_file_changes(tmp_path: Path) -> None:
    path = write_gguf(tmp_path / "m.gguf", llama_model(vocab=vocab_size(), layers=1))
    first = resolve_model(str(path))
    assert resolve_model(str(path)) == first
    assert (first / "model.gguf").resolve() == path.resolve()
    write_gguf(path, llama_model(vocab=vocab_size(), layers=1, tied=True))
    second = resolve_model(str(path))
    assert second != first and load_config(second).tie_word_embeddings


def test_unsupported_architecture_is_named(tmp_path: Path) -> None:
    import gguf

    path = tmp_path / "other.gguf"
    writer = gguf.GGUFWriter(str(path), "falcon")
    writer.add_block_count(1)
    writer.add_tensor("token_embd.weight", np.zeros((4, 8), dtype=np.float32))
    writer.write_header_to_file(), writer.write_kv_data_to_file(), writer.write_tensors_to_file(), writer.close()
    with pytest.raises(ConfigError, match="architecture 'falcon' is not supported"):
        resolve_model(str(path))


def test_unsupported_quantization_is_named(tmp_path: Path) -> None:
    import gguf

    path = write_gguf(tmp_path / "m.gguf", llama_model(vocab=vocab_size(), layers=1), quant="Q8_0")
    raw = gguf.GGUFReader(path)
    writer = gguf.GGUFWriter(str(tmp_path / "bad.gguf"), "llama")
    for key, field in raw.fields.items():
        if not key.startswith(("GGUF.", "general.architecture")):
            writer.add_key_value(key, field.contents(), field.types[0], sub_type=field.types[-1] if len(field.types) > 1 else None)
    for t in raw.tensors:
        data = np.array(t.data)
        if t.name == "blk.0.ffn_up.weight":
            writer.add_tensor(t.name, gguf.quants.dequantize(data, t.tensor_type).astype(np.float64))
        else:
            writer.add_tensor(t.name, data, raw_dtype=t.tensor_type if data.dtype == np.uint8 else None)
    writer.write_header_to_file(), writer.write_kv_data_to_file(), writer.write_tensors_to_file(), writer.close()
    with pytest.raises(ConfigError, match="blk.0.ffn_up.weight: quantization F64 is not supported"):
        _ours(tmp_path / "bad.gguf")


def test_llama3_rope_freqs_and_stray_tensors_are_refused(tmp_path: Path) -> None:
    model = llama_model(vocab=vocab_size(), layers=1)
    path = write_gguf(tmp_path / "r.gguf", model, extra_tensors={"rope_freqs.weight": np.ones(32, np.float32)})
    with pytest.raises(ConfigError, match="rope_freqs"):
        resolve_model(str(path))
    path = write_gguf(tmp_path / "s.gguf", model, extra_tensors={"blk.0.stray.weight": np.ones(4, np.float32)})
    with pytest.raises(ConfigError, match=r"unexpected tensors: blk\.0\.stray\.weight"):
        _ours(path)


def test_a_file_that_is_not_gguf_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "model.bin"
    path.write_bytes(b"PK\x03\x04 not a gguf")
    with pytest.raises(ConfigError, match="not a GGUF file"):
        resolve_model(str(path))
