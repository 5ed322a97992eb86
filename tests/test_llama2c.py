"""The llama2.c converter: converted models agree with a numpy llama2.c forward and with transformers."""

import json
import pathlib
import struct

import jax.numpy as jnp
import numpy as np
import pytest

from specjax.engine.cli import main
from specjax.engine.plain import greedy_generate
from specjax.models import decoder, llama2c
from specjax.models.llama2c import Llama2cHeader, convert_llama2c, numpy_forward, read_llama2c
from specjax.models.loading import load_model
from specjax.models.safetensors_io import CheckpointError

STORIES260K = pathlib.Path(__file__).resolve().parents[2] / "shared" / "models" / "tinyllamas" / "stories260K.bin"
# Greedy ids from BOS listed in ../shared/models/README.md (checked there against llama2.c's model.py).
STORIES260K_GREEDY = [461, 461, 401, 401, 401, 461, 378, 455, 473, 456, 435, 299, 362, 409, 283]
TOKENS = np.array([1, 7, 33, 12, 60, 5, 19, 42, 3, 27, 8, 50, 61])


def random_header(shared: bool, version: int = 0) -> Llama2cHeader:
    return Llama2cHeader(dim=32, hidden_dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=64, seq_len=64,
                         shared_classifier=shared, version=version)


def random_weights(h: Llama2cHeader, seed: int) -> dict[str, np.ndarray]:
    """Random tensors in llama2.c's layout, large enough that RoPE visibly moves the logits."""
    rng = np.random.default_rng(seed)
    weights = {}
    for name, shape in llama2c.tensor_shapes(h).items():
        if name.startswith("rms_"):
            weights[name] = rng.uniform(0.5, 1.5, shape).astype(np.float32)
        else:
            weights[name] = (0.3 * rng.standard_normal(shape)).astype(np.float32)
    return weights


def write_llama2c(path, h: Llama2cHeader, weights: dict[str, np.ndarray]) -> str:
    """A checkpoint file exactly as llama2.c's export.py writes it (legacy_export / version1_export)."""
    vocab = h.vocab_size if h.shared_classifier else -h.vocab_size
    fields = (h.dim, h.hidden_dim, h.n_layers, h.n_heads, h.n_kv_heads)
    if h.version == 0:
        head = struct.pack("<7i", *fields, vocab, h.seq_len)
    else:
        head = struct.pack("<Ii7iB", llama2c.MAGIC, h.version, *fields, h.vocab_size, h.seq_len,
                           int(h.shared_classifier))
        head += b"\0" * (256 - len(head))
    with open(path, "wb") as f:
        f.write(head)
        for name in llama2c.tensor_shapes(h):
            f.write(np.ascontiguousarray(weights[name], "<f4").tobytes())
    return str(path)


def specjax_logits(model_dir: str, tokens: np.ndarray) -> np.ndarray:
    model = load_model(model_dir, dtype=jnp.float32)
    t = len(tokens)
    out = decoder.forward(model.params, model.config, jnp.asarray(tokens[None]), jnp.arange(t)[None],
                          decoder.KVCache.zeros(model.config, 1, t), jnp.zeros(1, jnp.int32),
                          decoder.causal_mask(1, t))
    return np.asarray(out.logits[0])


def transformers_model(model_dir: str):
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    return transformers.LlamaForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()


def transformers_logits(model_dir: str, tokens: np.ndarray) -> np.ndarray:
    import torch

    with torch.no_grad():
        return transformers_model(model_dir)(torch.tensor(tokens[None])).logits[0].numpy()


@pytest.fixture(scope="module", params=[True, False], ids=["shared-classifier", "separate-classifier"])
def converted(request, tmp_path_factory):
    """(header, llama2.c weights, converted directory) of a random checkpoint."""
    tmp = tmp_path_factory.mktemp("llama2c")
    h = random_header(shared=request.param)
    weights = random_weights(h, seed=int(request.param))
    path = write_llama2c(tmp / "model.bin", h, weights)
    convert_llama2c(path, str(tmp / "hf"))
    return h, weights, str(tmp / "hf")


def test_reader_returns_the_written_tensors(converted, tmp_path):
    h, weights, _ = converted
    got_header, got = read_llama2c(write_llama2c(tmp_path / "m.bin", h, weights))
    assert got_header == h
    assert sorted(got) == sorted(weights)
    for name in weights:
        np.testing.assert_array_equal(got[name], weights[name])


def test_config_describes_the_checkpoint(converted):
    h, _, model_dir = converted
    with open(pathlib.Path(model_dir) / "config.json") as f:
        cfg = json.load(f)
    assert (cfg["hidden_size"], cfg["intermediate_size"], cfg["num_hidden_layers"]) == (32, 64, 2)
    assert (cfg["num_attention_heads"], cfg["num_key_value_heads"], cfg["vocab_size"]) == (4, 2, 64)
    assert cfg["max_position_embeddings"] == 64 and cfg["tie_word_embeddings"] is h.shared_classifier
    assert not (pathlib.Path(model_dir) / "tokenizer.json").exists()


def test_specjax_logits_match_the_numpy_llama2c_forward(converted):
    h, weights, model_dir = converted
    expected = numpy_forward(weights, h, TOKENS)
    np.testing.assert_allclose(specjax_logits(model_dir, TOKENS), expected, atol=1e-4, rtol=1e-4)


def test_transformers_logits_match_the_numpy_llama2c_forward(converted):
    h, weights, model_dir = converted
    expected = numpy_forward(weights, h, TOKENS)
    np.testing.assert_allclose(transformers_logits(model_dir, TOKENS), expected, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("wrong_permutation", [
    lambda w, n: w,  # no permutation at all
    lambda w, n: w.reshape(n, 2, -1, w.shape[1]).transpose(0, 2, 1, 3).reshape(w.shape),  # the inverse one
], ids=["none", "inverse"])
def test_a_wrong_rope_permutation_changes_the_logits(wrong_permutation, tmp_path, monkeypatch):
    """Negative controls: the parity tests above would catch a missing or inverted q/k permutation."""
    h = random_header(shared=True)
    weights = random_weights(h, seed=5)
    path = write_llama2c(tmp_path / "m.bin", h, weights)
    monkeypatch.setattr(llama2c, "interleaved_to_halves", wrong_permutation)
    convert_llama2c(path, str(tmp_path / "hf"))
    diff = np.abs(specjax_logits(str(tmp_path / "hf"), TOKENS) - numpy_forward(weights, h, TOKENS))
    assert diff[0].max() < 1e-4  # position 0 is not rotated: only RoPE differs
    assert diff[1:].max() > 1e-2


def test_permutation_moves_interleaved_pairs_to_halves():
    w = np.arange(2 * 8)[:, None].astype(np.float32)  # 2 heads of head_dim 8, row i holds i
    got = llama2c.interleaved_to_halves(w, n_heads=2)[:, 0]
    np.testing.assert_array_equal(got, [0, 2, 4, 6, 1, 3, 5, 7, 8, 10, 12, 14, 9, 11, 13, 15])


def test_version1_export_reads_like_version0(tmp_path):
    h0, h1 = random_header(shared=False), random_header(shared=False, version=1)
    weights = random_weights(h0, seed=3)
    _, w0 = read_llama2c(write_llama2c(tmp_path / "v0.bin", h0, weights))
    got_header, w1 = read_llama2c(write_llama2c(tmp_path / "v1.bin", h1, weights))
    assert got_header == h1 and "freq_cis_real" not in w1
    for name in w1:
        np.testing.assert_array_equal(w1[name], w0[name])


def test_quantized_version2_is_refused(tmp_path):
    path = tmp_path / "q8.bin"
    path.write_bytes(struct.pack("<Ii7iB", llama2c.MAGIC, 2, 32, 64, 2, 4, 2, 64, 64, 1).ljust(256, b"\0"))
    with pytest.raises(CheckpointError, match="Q8_0 .*version 2 is not supported"):
        read_llama2c(str(path))


@pytest.mark.parametrize("change, message", [
    (lambda data: data[:-4], r"is \d+ bytes but .* implies exactly \d+ bytes: truncated"),
    (lambda data: data + b"\0" * 8, r"implies exactly \d+ bytes: has trailing bytes"),
    (lambda data: data[:10], "too short for a llama2.c header"),
])
def test_wrong_file_size_is_a_clear_error(change, message, tmp_path):
    h = random_header(shared=True)
    good = pathlib.Path(write_llama2c(tmp_path / "good.bin", h, random_weights(h, seed=0)))
    bad = tmp_path / "bad.bin"
    bad.write_bytes(change(good.read_bytes()))
    with pytest.raises(CheckpointError, match=message):
        read_llama2c(str(bad))


@pytest.mark.parametrize("header, message", [
    ((32, 64, 2, 4, 2, 64, 0), "seq_len=0 is out of range"),
    ((32, 64, 2, 5, 5, 64, 64), "dim=32 must split into n_heads=5"),
    ((32, 64, 2, 4, 3, 64, 64), "n_heads=4 is not a multiple of n_kv_heads=3"),
    ((-32, 64, 2, 4, 2, 64, 64), "dim=-32 is out of range"),
])
def test_insane_header_is_a_clear_error(header, message, tmp_path):
    path = tmp_path / "bad.bin"
    path.write_bytes(struct.pack("<7i", *header) + b"\0" * 4096)
    with pytest.raises(CheckpointError, match=message):
        read_llama2c(str(path))


def test_cli_converts_end_to_end(tmp_path, capsys):
    h = random_header(shared=False)
    weights = random_weights(h, seed=7)
    path = write_llama2c(tmp_path / "m.bin", h, weights)
    assert main(["convert-llama2c", path, str(tmp_path / "out")]) == 0
    assert "wrote" in capsys.readouterr().out
    np.testing.assert_allclose(specjax_logits(str(tmp_path / "out"), TOKENS), numpy_forward(weights, h, TOKENS),
                               atol=1e-4, rtol=1e-4)


@pytest.mark.skipif(not STORIES260K.exists(), reason="needs ../shared/models/tinyllamas/stories260K.bin")
def test_stories260k_greedy_ids_match_the_published_check(tmp_path):
    import torch

    header, weights = read_llama2c(str(STORIES260K))
    ids = [llama2c.BOS_ID]
    for _ in STORIES260K_GREEDY:
        ids.append(int(numpy_forward(weights, header, ids)[-1].argmax()))
    assert ids[1:] == STORIES260K_GREEDY

    model_dir = str(tmp_path / "stories260K")
    convert_llama2c(str(STORIES260K), model_dir)
    model = load_model(model_dir, dtype=jnp.float32)
    n = len(STORIES260K_GREEDY)
    assert greedy_generate(model, [[llama2c.BOS_ID]], max_new_tokens=n, stop_at_eos=False)[0] == STORIES260K_GREEDY
    with torch.no_grad():
        out = transformers_model(model_dir).generate(torch.tensor([[llama2c.BOS_ID]]), do_sample=False,
                                                     max_new_tokens=n, eos_token_id=None, pad_token_id=0)
    assert out[0, 1:].tolist() == STORIES260K_GREEDY
