"""The shipped ``stdlib-code`` model and the corpus split of its build script.

The checkpoint must load in specjax and in transformers with the same logits, its
tokenizer must round-trip held-out source exactly, and it must be a real code
model: on held-out stdlib modules its next-token loss is far below the best
unigram model of the same tokens. The build's corpus split must be deterministic,
exclude tests and keep the held-out modules out of training.
"""

import json
import os
import pathlib
import sysconfig

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from engine_helpers import load_benchmark
from specjax.models.decoder import KVCache, causal_mask, forward
from specjax.models.embedded import code_model_dir
from specjax.models.loading import load_model

MODEL_DIR = code_model_dir()
STDLIB = sysconfig.get_paths()["stdlib"]
WINDOW = 512


def _build_script():
    return load_benchmark("train_code_model")


@pytest.fixture(scope="module")
def meta():
    with open(os.path.join(MODEL_DIR, "training.json")) as f:
        return json.load(f)


@pytest.fixture(scope="module")
def model():
    return load_model(MODEL_DIR, dtype=jnp.float32)


@pytest.fixture(scope="module")
def heldout_texts(meta):
    """This machine's copies of the held-out files (the stdlib differs a little across versions)."""
    paths = [os.path.join(STDLIB, p) for p in meta["heldout_files"]]
    texts = [pathlib.Path(p).read_text(encoding="utf-8") for p in paths if os.path.isfile(p)]
    if len(texts) < 5:
        pytest.skip(f"fewer than 5 of the held-out stdlib files exist under {STDLIB}")
    return texts


@pytest.fixture(scope="module")
def heldout_windows(model, heldout_texts):
    """Four 512-token windows of held-out code, from four different files."""
    eos = model.config.eos_token_ids[0]
    windows = []
    for text in sorted(heldout_texts, key=len, reverse=True)[:4]:
        ids = model.tokenizer.encode(text).ids + [eos]
        assert len(ids) >= WINDOW
        mid = (len(ids) - WINDOW) // 2
        windows.append(ids[mid: mid + WINDOW])
    return np.asarray(windows, np.int32)


def _logits(model, tokens: np.ndarray) -> np.ndarray:
    b, t = tokens.shape
    cfg = model.config
    out = forward(model.params, cfg, jnp.asarray(tokens), jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t)),
                  KVCache.zeros(cfg, b, t), jnp.zeros(b, jnp.int32), causal_mask(b, t))
    return np.asarray(out.logits, np.float64)


def test_checkpoint_files_and_size(meta):
    names = set(os.listdir(MODEL_DIR))
    assert {"config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json",
            "generation_config.json", "training.json"} <= names
    total = sum(os.path.getsize(os.path.join(MODEL_DIR, n)) for n in names)
    assert total < 12e6, f"stdlib-code is {total / 1e6:.2f} MB"
    with open(os.path.join(MODEL_DIR, "config.json")) as f:
        cfg = json.load(f)
    assert cfg["model_type"] == "llama" and cfg["tie_word_embeddings"] is True
    assert cfg["num_key_value_heads"] < cfg["num_attention_heads"]  # GQA
    assert 1e6 <= meta["params"] <= 5e6
    assert len(meta["corpus_sha256"]) == 64 and meta["python_version"].count(".") == 2


def test_model_loads_with_eos_from_its_tokenizer(model):
    assert model.tokenizer is not None
    assert model.config.eos_token_ids == (model.tokenizer.token_to_id("<|endoftext|>"),)
    assert model.config.vocab_size == model.tokenizer.get_vocab_size()


def test_logits_match_transformers(model, heldout_windows):
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    hf = transformers.LlamaForCausalLM.from_pretrained(MODEL_DIR, dtype=torch.float32).eval()
    tokens = heldout_windows[:1, :256]
    with torch.no_grad():
        ref = hf(torch.tensor(tokens, dtype=torch.long)).logits.numpy()
    np.testing.assert_allclose(_logits(model, tokens), ref, atol=2e-4, rtol=2e-4)


def test_tokenizer_round_trips_heldout_code(model, heldout_texts):
    tok = model.tokenizer
    for text in heldout_texts:
        assert tok.decode(tok.encode(text).ids) == text
    tricky = "\tif x:\n\t\treturn  'é ✓ \\u00e9'  \n\n    \n# trailing   \r\n\x0c"
    assert tok.decode(tok.encode(tricky).ids) == tricky


def test_heldout_loss_is_below_a_unigram_model_of_the_heldout_code(model, heldout_windows, heldout_texts, meta):
    """The model predicts held-out code from context, better than any context-free model of it.

    The baseline is the unigram distribution (add-one) of all held-out files' tokens, the
    scored windows included, so it is fitted on the test text itself; random weights
    score about ln(vocab), far above it."""
    tokens = heldout_windows
    logits = _logits(model, tokens)[:, :-1].astype(np.float32)
    logp = np.asarray(jax.nn.log_softmax(jnp.asarray(logits), axis=-1))
    targets = tokens[:, 1:]
    loss = float(-np.take_along_axis(logp, targets[..., None], -1).mean())
    all_ids = np.concatenate([model.tokenizer.encode(t).ids for t in heldout_texts])
    counts = np.bincount(all_ids, minlength=model.config.vocab_size) + 1.0
    unigram = float(-np.log(counts / counts.sum())[targets].mean())
    assert loss < unigram - 0.5, (loss, unigram)
    assert abs(loss - meta["heldout_loss"]) < 0.6, (loss, meta["heldout_loss"])  # what the build measured


def test_training_json_heldout_modules_are_disjoint_from_training(meta):
    script = _build_script()
    held = {script.module_name(p) for p in meta["heldout_files"]}
    train = set(meta["train_modules"])
    assert held and train and not held & train
    assert not {m for m in train if script.is_heldout(m, tuple(meta["heldout_module_names"]))}
    for name in meta["heldout_module_names"]:  # every named module contributed held-out files
        assert any(m == name or m.startswith(name + ".") for m in held), name
    assert not any(".test" in m or m.startswith("test.") for m in train)


def _write(root: pathlib.Path, rel: str, size: int = 10) -> None:
    path = root / rel
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("x = 1\n" + "#" * max(0, size - 6))


FAKE_STDLIB = {
    "os.py": 10, "csv.py": 10, "jsonx.py": 10, "json/__init__.py": 10, "json/decoder.py": 10,
    "email/mime/text.py": 10, "test/test_json.py": 10, "unittest/test/test_case.py": 10,
    "idlelib/idle_test/test_x.py": 10, "idlelib/test/test_y.py": 10, "lib2to3/tests/data/bad.py": 10,
    "site-packages/pkg/mod.py": 10, "encodings/cp1252.py": 10, "_sysconfigdata__linux_x86_64.py": 10,
    "config-3.11-x86_64-linux-gnu/python-config.py": 10, "big.py": 200_001, "notes.txt": 10,
}


def test_corpus_split_is_deterministic_and_excludes_tests(tmp_path):
    script = _build_script()
    a, b = tmp_path / "a", tmp_path / "b"
    for rel, size in FAKE_STDLIB.items():
        _write(a, rel, size)
    for rel, size in reversed(list(FAKE_STDLIB.items())):  # another creation order
        _write(b, rel, size)
    files = script.corpus_files(str(a))
    assert files == script.corpus_files(str(b)) == sorted(files)
    assert files == ["csv.py", "email/mime/text.py", "json/__init__.py", "json/decoder.py", "jsonx.py", "os.py"]
    train, held = script.split_corpus(files, heldout=("json", "csv"))
    assert held == ["csv.py", "json/__init__.py", "json/decoder.py"]
    assert train == ["email/mime/text.py", "jsonx.py", "os.py"]  # jsonx is not json
    assert script.module_name("json/__init__.py") == "json"
    assert script.module_name("email/mime/text.py") == "email.mime.text"
    with pytest.raises(ValueError, match="argparse"):
        script.split_corpus(files, heldout=("json", "argparse"))


def test_shipped_split_modules_exist_in_this_stdlib():
    script = _build_script()
    train, held = script.split_corpus(script.corpus_files(STDLIB))
    assert train and held and not set(train) & set(held)


def test_training_windows_are_a_pure_function_of_the_position():
    """A resumed build draws exactly the windows the uninterrupted one would have drawn."""
    script = _build_script()
    stream = np.arange(105, dtype=np.int32)  # 10 windows of 10 tokens, 5 tokens left over
    epoch = script.window_batch(stream, seq_len=10, batch_size=10, position=0, seed=3)
    assert sorted(epoch[:, 0].tolist()) == list(range(0, 100, 10))  # each window once per epoch
    np.testing.assert_array_equal(script.window_batch(stream, 10, 4, 6, 3), epoch[6:10])
    next_epoch = script.window_batch(stream, 10, 10, 10, 3)
    assert sorted(next_epoch[:, 0].tolist()) == list(range(0, 100, 10))
    assert not np.array_equal(next_epoch, epoch)  # a fresh order per epoch
    assert not np.array_equal(script.window_batch(stream, 10, 10, 0, 4), epoch)  # and per seed


def test_a_build_resumes_only_with_the_arguments_it_started_with(tmp_path):
    """``models.training.check_run_args``, shared by the build scripts' ``--resume``."""
    from specjax.models.training import check_run_args

    run = str(tmp_path / "ckpt")
    check_run_args(run, {"steps": 10, "seed": 0}, resume=False)  # a fresh build records its arguments
    check_run_args(run, {"steps": 10, "seed": 0}, resume=True)
    with pytest.raises(SystemExit, match="--resume to continue"):
        check_run_args(run, {"steps": 10, "seed": 0}, resume=False)
    with pytest.raises(SystemExit, match="'steps': \\(10, 20\\)"):
        check_run_args(run, {"steps": 20, "seed": 0}, resume=True)
