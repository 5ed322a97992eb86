"""GGUF checkpoints: tiny random files written with gguf.GGUFWriter, loaded by specjax and by transformers.

Both read the same file, so any difference in dequantization, the q/k un-permutation, tied
embeddings, biases, the config or the tokenizer shows up as different logits or token ids.
"""

import functools
import json
import os

import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")
gguf = pytest.importorskip("gguf")

from hf_models import prefill_logits, save_hf_model
from specjax.models import gguf as sj_gguf
from specjax.models.gguf import GGUFError, convert_gguf
from specjax.models.loading import load_model, read_chat_strings

Q = gguf.GGMLQuantizationType
HIDDEN, INTER, LAYERS, HEADS, KV_HEADS = 256, 256, 2, 4, 2  # rows of 256: every block type fits
HEAD_DIM = HIDDEN // HEADS
BLOCK_TYPES = ("F32", "F16", "Q4_0", "Q4_1", "Q5_0", "Q8_0", "Q4_K", "Q6_K")  # what llama.cpp files mostly use
MORE_BLOCK_TYPES = ("BF16", "Q5_1", "Q2_K", "Q3_K", "Q5_K")  # also dequantized; checked on llama only
ALL_TYPES = BLOCK_TYPES + MORE_BLOCK_TYPES
# K-quant layouts: where each block keeps its float16 scales, and their range so values stay ~0.1
K_SCALES = {"Q2_K": ((-4, -2), 1e-3, 2e-3), "Q3_K": ((-2,), 5e-4, 1e-3), "Q4_K": ((0, 2), 5e-5, 2e-4),
            "Q5_K": ((0, 2), 3e-5, 1e-4), "Q6_K": ((-2,), 1e-5, 4e-5)}
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|eot|>"]
USER_DEFINED = "<think>"
CHAT_TEMPLATE = ("{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\\n' + m['content'] + '<|im_end|>\\n' }}"
                 "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}")
CORPUS = ["The quick brown fox jumps over the lazy dog. " * 3, "SELECT name FROM users WHERE city = 'Lagos';",
          "def add(a, b):\n    return a + b\n", "Hello, world! It's 2024 and they've 12345 items.",
          "the theory of the thing: there, then, these, those. I'm sure you'll see."]
TEXTS = ["Hello world", "  leading spaces, tabs\tand\nnewlines\n\n", "it's 2024: 1234567 items!",
         "SELECT * FROM t; <|im_start|>user\nhi<|im_end|><|endoftext|>", "unicode: élève 東京 😀 <think>ok</think>",
         "they've <|eot|> the end"]


@functools.lru_cache(maxsize=None)
def byte_level_vocab() -> tuple[tuple[str, ...], tuple[int, ...], tuple[str, ...]]:
    """(tokens, token types, merges) of a byte-level BPE trained on a tiny corpus, specials first."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    trainer = trainers.BpeTrainer(vocab_size=340, special_tokens=SPECIALS, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(CORPUS, trainer)
    model = json.loads(tok.to_str())["model"]
    tokens = [t for t, _ in sorted(model["vocab"].items(), key=lambda kv: kv[1])] + [USER_DEFINED]
    types = [3 if t in SPECIALS else 4 if t == USER_DEFINED else 1 for t in tokens]
    merges = [m if isinstance(m, str) else " ".join(m) for m in model["merges"]]
    return tuple(tokens), tuple(types), tuple(merges)


def _random_k_blocks(rng, rows: int, cols: int, qtype_name: str) -> np.ndarray:
    """Valid random K-quant blocks (gguf.quants cannot quantize these in numpy): random bytes with
    small finite float16 scales (d, dmin) where the format keeps them."""
    block_size, type_size = gguf.GGML_QUANT_SIZES[Q[qtype_name]]
    blocks = rng.integers(0, 256, (rows, cols // block_size, type_size), dtype=np.uint8)
    offsets, low, high = K_SCALES[qtype_name]
    for offset in offsets:
        scale = rng.uniform(low, high, (rows, cols // block_size, 1)).astype(np.float16).view(np.uint8)
        blocks[..., offset:offset + 2 or None] = scale  # offset -2 is the last two bytes
    return blocks.reshape(rows, -1)


def _add_weight(writer, rng, name: str, values: np.ndarray, qtype_name: str, tag_as: str = None) -> None:
    """A 2-D weight in ``qtype_name`` (``tag_as``: store those bytes but claim another type of equal size)."""
    qtype = Q[qtype_name]
    if qtype_name == "F32":
        writer.add_tensor(name, values.astype(np.float32))
    elif qtype_name == "F16" and tag_as:
        writer.add_tensor(name, values.astype(np.float16).view(np.uint8), raw_dtype=Q[tag_as])
    elif qtype_name == "F16":
        writer.add_tensor(name, values.astype(np.float16))
    else:
        raw = (_random_k_blocks(rng, *values.shape, qtype_name) if qtype_name.endswith("_K")
               else gguf.quants.quantize(values.astype(np.float32), qtype))
        writer.add_tensor(name, raw, raw_dtype=Q[tag_as or qtype_name])


def write_gguf(path: str, arch: str = "llama", block_type: str = "F32", *, pre: str = "smollm", seed: int = 0,
               skip_keys=(), tag_as: str = None, tokenizer_model: str = "gpt2", normal_typed=()) -> str:
    """A tiny random ``arch`` model (llama: untied output; qwen2: tied, q/k/v biases; qwen3: q/k norms)
    with a byte-level tokenizer and a chat template."""
    rng = np.random.default_rng(seed)
    tokens, types, merges = byte_level_vocab()
    vocab = len(tokens)
    w = gguf.GGUFWriter(path, arch)
    meta = {
        "block_count": (w.add_block_count, LAYERS), "context_length": (w.add_context_length, 256),
        "embedding_length": (w.add_embedding_length, HIDDEN), "feed_forward_length": (w.add_feed_forward_length, INTER),
        "head_count": (w.add_head_count, HEADS), "head_count_kv": (w.add_head_count_kv, KV_HEADS),
        "rope_freq_base": (w.add_rope_freq_base, 10000.0), "rms_eps": (w.add_layer_norm_rms_eps, 1e-5),
        "rope_dimension_count": (w.add_rope_dimension_count, HEAD_DIM),
    }
    if arch == "qwen3":
        meta["key_length"] = (w.add_key_length, HEAD_DIM)
    for key, (add, value) in meta.items():
        if key not in skip_keys:
            add(value)
    w.add_tokenizer_model(tokenizer_model)
    w.add_tokenizer_pre(pre)
    w.add_token_list(list(tokens))
    w.add_token_types([1 if t in normal_typed else kind for t, kind in zip(tokens, types)])
    w.add_token_merges(list(merges))
    w.add_bos_token_id(tokens.index("<|im_start|>"))
    w.add_eos_token_id(tokens.index("<|im_end|>"))
    w.add_eot_token_id(tokens.index("<|eot|>"))
    w.add_unk_token_id(tokens.index("<|endoftext|>"))
    w.add_add_bos_token(False)
    w.add_chat_template(CHAT_TEMPLATE)

    def weight(name, out_dim, in_dim):
        _add_weight(w, rng, name, rng.normal(0, 0.1, (out_dim, in_dim)), block_type, tag_as)

    def vector(name, n, center=0.0):
        w.add_tensor(name, (center + rng.uniform(-0.5, 0.5, n) if center else rng.normal(0, 0.1, n)).astype(np.float32))

    weight("token_embd.weight", vocab, HIDDEN)
    vector("output_norm.weight", HIDDEN, center=1.0)
    if arch != "qwen2":
        weight("output.weight", vocab, HIDDEN)
    for i in range(LAYERS):
        vector(f"blk.{i}.attn_norm.weight", HIDDEN, center=1.0)
        vector(f"blk.{i}.ffn_norm.weight", HIDDEN, center=1.0)
        weight(f"blk.{i}.attn_q.weight", HEADS * HEAD_DIM, HIDDEN)
        weight(f"blk.{i}.attn_k.weight", KV_HEADS * HEAD_DIM, HIDDEN)
        weight(f"blk.{i}.attn_v.weight", KV_HEADS * HEAD_DIM, HIDDEN)
        weight(f"blk.{i}.attn_output.weight", HIDDEN, HEADS * HEAD_DIM)
        weight(f"blk.{i}.ffn_gate.weight", INTER, HIDDEN)
        weight(f"blk.{i}.ffn_up.weight", INTER, HIDDEN)
        weight(f"blk.{i}.ffn_down.weight", HIDDEN, INTER)
        if arch == "qwen3":
            vector(f"blk.{i}.attn_q_norm.weight", HEAD_DIM, center=1.0)
            vector(f"blk.{i}.attn_k_norm.weight", HEAD_DIM, center=1.0)
        if arch == "qwen2":
            vector(f"blk.{i}.attn_q.bias", HEADS * HEAD_DIM)
            vector(f"blk.{i}.attn_k.bias", KV_HEADS * HEAD_DIM)
            vector(f"blk.{i}.attn_v.bias", KV_HEADS * HEAD_DIM)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def _hf_logits(path: str, tokens: np.ndarray) -> np.ndarray:
    import transformers

    hf = transformers.AutoModelForCausalLM.from_pretrained(
        os.path.dirname(path), gguf_file=os.path.basename(path), dtype=torch.float32).eval()
    with torch.no_grad():
        return hf(torch.tensor(tokens)).logits.numpy()


def _hf_tokenizer(path: str):
    import transformers

    return transformers.AutoTokenizer.from_pretrained(os.path.dirname(path), gguf_file=os.path.basename(path))


TOKENS = np.random.default_rng(0).integers(0, 300, (2, 13))


@pytest.mark.parametrize("arch,block_type", [(a, b) for a in ("llama", "qwen2") for b in BLOCK_TYPES]
                         + [("llama", b) for b in MORE_BLOCK_TYPES])
def test_logits_match_transformers_gguf_loading(tmp_path, arch, block_type):
    path = write_gguf(str(tmp_path / "m.gguf"), arch, block_type, seed=ALL_TYPES.index(block_type))
    model = load_model(path)
    assert model.params["embed"].dtype == jnp.float32  # dtype auto on a CPU: GGUF dequantizes to float32
    assert model.config.tie_word_embeddings == (arch == "qwen2") and model.config.qkv_bias == (arch == "qwen2")
    expected = _hf_logits(path, TOKENS)
    assert np.abs(expected).max() > 0.1  # not flat: the comparison has something to compare
    np.testing.assert_allclose(prefill_logits(model, TOKENS), expected, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("block_type", ["F16", "Q4_K"])
def test_qwen3_logits_match_transformers_on_the_converted_directory(tmp_path, block_type):
    """transformers' GGUF loader misreads qwen3 files (it ignores head_count_kv), so its Qwen3 model
    is run on the directory convert-gguf writes; no q/k permutation is involved for qwen3."""
    import transformers

    path = write_gguf(str(tmp_path / "m.gguf"), "qwen3", block_type)
    convert_gguf(path, str(tmp_path / "hf"), progress=False)
    hf = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path / "hf"), dtype=torch.float32).eval()
    with torch.no_grad():
        expected = hf(torch.tensor(TOKENS)).logits.numpy()
    model = load_model(path)
    assert model.config.qk_norm and not model.config.qkv_bias
    np.testing.assert_allclose(prefill_logits(model, TOKENS), expected, atol=1e-4, rtol=1e-4)


def test_llama_without_unpermuting_qk_differs(tmp_path, monkeypatch):
    """Negative control: llama.cpp's q/k row order, used as is, gives other logits."""
    path = write_gguf(str(tmp_path / "m.gguf"), "llama", "F32")
    expected = _hf_logits(path, TOKENS)
    monkeypatch.setattr(sj_gguf, "unpermute_qk", lambda weight, num_heads: weight)
    wrong = prefill_logits(load_model(path), TOKENS)
    assert np.abs(wrong - expected).max() > 1e-2


def test_values_read_as_another_type_of_equal_size_differ(tmp_path):
    """Negative control: float16 bytes tagged BF16 (also 2 bytes a value) load, but decode to other
    weights: the block type recorded per tensor is the one honored."""
    right = write_gguf(str(tmp_path / "right.gguf"), "llama", "F16", seed=3)
    wrong = write_gguf(str(tmp_path / "wrong.gguf"), "llama", "F16", seed=3, tag_as="BF16")
    expected = _hf_logits(right, TOKENS)
    assert np.abs(prefill_logits(load_model(wrong), TOKENS) - expected).max() > 1e-2


@pytest.mark.parametrize("arch,pre", [("llama", "smollm"), ("llama", "llama-bpe"), ("qwen2", "qwen2")])
def test_tokenizer_matches_transformers(tmp_path, arch, pre):
    path = write_gguf(str(tmp_path / "m.gguf"), arch, "F32", pre=pre)
    hf, model = _hf_tokenizer(path), load_model(path)
    for text in TEXTS:
        assert model.tokenizer.encode(text).ids == hf(text)["input_ids"], text
    conversation = [{"role": "system", "content": "Answer in SQL."},
                    {"role": "user", "content": "Count users in 'Lagos' <think>"}]
    rendered = hf.apply_chat_template(conversation, tokenize=False, add_generation_prompt=True)
    ids = hf.apply_chat_template(conversation, tokenize=True, add_generation_prompt=True)
    ids = list(ids["input_ids"] if hasattr(ids, "keys") else ids)
    assert model.tokenizer.encode(rendered).ids == ids
    assert model.tokenizer.decode(ids, skip_special_tokens=False) == rendered


def test_bos_and_eos_stay_whole_even_when_typed_normal(tmp_path):
    """transformers makes the tokens named by bos/eos ids special whatever their type; so does specjax."""
    path = write_gguf(str(tmp_path / "m.gguf"), normal_typed=("<|im_start|>", "<|im_end|>"))
    hf, model = _hf_tokenizer(path), load_model(path)
    text = "x <|im_start|> y<|im_end|>"
    assert model.tokenizer.encode(text).ids == hf(text)["input_ids"]
    assert model.tokenizer.encode("<|im_end|>").ids == [byte_level_vocab()[0].index("<|im_end|>")]


def test_tokenizer_pre_type_changes_the_split(tmp_path):
    """Negative control: the pre-tokenizer named in the file matters (qwen2 splits digits one by one)."""
    default = load_model(write_gguf(str(tmp_path / "a.gguf"), pre="smollm")).tokenizer
    qwen = load_model(write_gguf(str(tmp_path / "b.gguf"), pre="qwen2")).tokenizer
    assert default.encode("12345 items").ids != qwen.encode("12345 items").ids


def test_special_tokens_eos_ids_and_chat_strings(tmp_path):
    path = write_gguf(str(tmp_path / "m.gguf"))
    model = load_model(path)
    tokens = byte_level_vocab()[0]
    assert model.config.eos_token_ids == (tokens.index("<|im_end|>"), tokens.index("<|eot|>"))
    assert model.config.bos_token_id == tokens.index("<|im_start|>")
    assert (model.chat_template, model.bos_token, model.eos_token) == (CHAT_TEMPLATE, "<|im_start|>", "<|im_end|>")
    assert model.tokenizer.encode("<|im_end|>").ids == [tokens.index("<|im_end|>")]


def test_convert_gguf_writes_a_directory_transformers_and_specjax_load(tmp_path):
    import transformers

    from specjax.engine.cli import main

    # pre="qwen2": transformers tokenizes any qwen2 directory with Qwen2Tokenizer's split, as real files name it
    path = write_gguf(str(tmp_path / "m.gguf"), "qwen2", "Q8_0", pre="qwen2")
    out = str(tmp_path / "hf")
    assert main(["convert-gguf", path, out]) == 0
    hf = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    with torch.no_grad():
        from_dir = hf(torch.tensor(TOKENS)).logits.numpy()
    np.testing.assert_allclose(from_dir, _hf_logits(path, TOKENS), atol=1e-5)
    model = load_model(out)
    assert model.params["embed"].dtype == jnp.float32
    np.testing.assert_allclose(prefill_logits(model, TOKENS), from_dir, atol=1e-4, rtol=1e-4)
    tok = transformers.AutoTokenizer.from_pretrained(out)
    assert all(tok(t)["input_ids"] == model.tokenizer.encode(t).ids for t in TEXTS)
    assert (model.chat_template, model.bos_token, model.eos_token) == (CHAT_TEMPLATE, "<|im_start|>", "<|im_end|>")
    assert model.config.eos_token_ids == load_model(path).config.eos_token_ids


def test_gguf_loads_onto_a_mesh_through_the_same_place_hook(tmp_path):
    from jax.sharding import PartitionSpec as P

    from specjax.models.sharding import make_mesh, pad_param

    path = write_gguf(str(tmp_path / "m.gguf"), "qwen2", "Q8_0")
    mesh = make_mesh(2, 4)
    sharded, plain = load_model(path, mesh=mesh), load_model(path)
    assert (sharded.config.num_kv_heads, plain.config.num_kv_heads) == (4, 2)  # kv heads repeated to the axis
    assert sharded.params["layers"]["wq"].sharding.spec == P(None, "model", None)
    for name in ("wq", "wk", "bk", "w_down"):
        np.testing.assert_array_equal(np.asarray(sharded.params["layers"][name]),
                                      pad_param(name, np.asarray(plain.params["layers"][name]), plain.config, mesh))


def test_generate_takes_a_gguf_file_as_model(tmp_path, capsys):
    from specjax.engine.cli import main

    path = write_gguf(str(tmp_path / "m.gguf"), "qwen2", "Q4_0")
    assert main(["generate", "--model", path, "--prompt", "the theory of the thing", "--max-new-tokens", "8",
                 "--drafter", "prompt-lookup", "--draft-capacity", "4", "--batch-size", "1", "--compare-baseline",
                 "--repeat", "1", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["identical_to_baseline"] is True and len(out["token_ids"][0]) >= 1


def test_auto_dtype_keeps_a_float32_checkpoint_in_float32(tmp_path):
    directory = save_hf_model("llama", str(tmp_path / "f32"))
    assert load_model(directory).params["layers"]["wq"].dtype == jnp.float32
    assert load_model(directory, jnp.bfloat16).params["layers"]["wq"].dtype == jnp.bfloat16


def test_chat_strings_of_a_hugging_face_directory(tmp_path):
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(
        {"chat_template": "from config", "bos_token": {"content": "<s>", "special": True}, "eos_token": "</s>"}))
    assert read_chat_strings(str(tmp_path)) == {"chat_template": "from config", "bos_token": "<s>",
                                                "eos_token": "</s>"}
    (tmp_path / "chat_template.jinja").write_text("from jinja")
    assert read_chat_strings(str(tmp_path))["chat_template"] == "from jinja"


def test_truncated_file_is_refused(tmp_path):
    path = write_gguf(str(tmp_path / "m.gguf"))
    size = os.path.getsize(path)
    with open(path, "r+b") as f:
        f.truncate(size - 1000)
    with pytest.raises(GGUFError, match="truncated"):
        load_model(path)


def test_not_a_gguf_file_is_refused(tmp_path):
    path = tmp_path / "m.gguf"
    path.write_bytes(b"PK\x03\x04 not a gguf")
    with pytest.raises(GGUFError, match="not a GGUF file"):
        load_model(str(path))


def test_unsupported_architecture_is_refused(tmp_path):
    path = str(tmp_path / "m.gguf")
    w = gguf.GGUFWriter(path, "phi3")
    w.add_block_count(1)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    with pytest.raises(GGUFError, match="architecture 'phi3' is not supported"):
        load_model(path)


def test_missing_metadata_key_is_named(tmp_path):
    path = write_gguf(str(tmp_path / "m.gguf"), skip_keys=("feed_forward_length",))
    with pytest.raises(GGUFError, match="llama.feed_forward_length"):
        load_model(path)


def test_sentencepiece_vocabulary_is_refused(tmp_path):
    path = write_gguf(str(tmp_path / "m.gguf"), tokenizer_model="llama")
    with pytest.raises(GGUFError, match="tokenizer.ggml.model is 'llama'"):
        load_model(path)


def test_unsupported_block_type_is_named(tmp_path):
    path = write_gguf(str(tmp_path / "m.gguf"), "llama", "Q4_0", tag_as="IQ4_NL")  # IQ4_NL: 18 bytes per 32 too
    with pytest.raises(GGUFError, match="block type IQ4_NL"):
        load_model(path)
