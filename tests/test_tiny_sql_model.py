"""The embedded tiny text-to-SQL model and its synthetic corpus.

The shipped checkpoint must load in specjax and in transformers with the same
logits, its tokenizer must round-trip the corpus, and greedy decoding must answer
a corpus question with SQL over the prompt's schema (evidence the training worked).
"""

import hashlib
import json
import os
import re

import jax.numpy as jnp
import numpy as np
import pytest

from specjax.models.decoder import KVCache, causal_mask, forward
from specjax.models.embedded import default_model_dir
from specjax.models.loading import load_model
from specjax.models.embedded.toy_corpus import SCHEMAS, sql_examples, sql_prompts

MODEL_DIR = default_model_dir()


@pytest.fixture(scope="module")
def model():
    return load_model(MODEL_DIR, dtype=jnp.float32)


def _schema_tables(prompt: str) -> list[str]:
    return re.findall(r"^CREATE TABLE (\w+) \(", prompt, flags=re.M)


def test_checkpoint_files_and_size():
    names = set(os.listdir(MODEL_DIR))
    assert {"config.json", "model.safetensors", "tokenizer.json", "generation_config.json"} <= names
    total = sum(os.path.getsize(os.path.join(MODEL_DIR, n)) for n in names)
    assert total < 3.2e6, f"embedded model is {total / 1e6:.2f} MB"
    with open(os.path.join(MODEL_DIR, "config.json")) as f:
        cfg = json.load(f)
    assert cfg["model_type"] == "llama" and cfg["tie_word_embeddings"] is True
    with open(os.path.join(MODEL_DIR, "generation_config.json")) as f:
        assert json.load(f)["eos_token_id"] == cfg["eos_token_id"]


def test_model_loads_with_eos_from_its_tokenizer(model):
    assert model.tokenizer is not None
    assert model.config.eos_token_ids == (model.tokenizer.token_to_id("<|endoftext|>"),)
    assert model.config.vocab_size == model.tokenizer.get_vocab_size()


def test_logits_match_transformers(model):
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    hf = transformers.LlamaForCausalLM.from_pretrained(MODEL_DIR, dtype=torch.float32).eval()
    ex = sql_examples(1, seed=5, split="eval")[0]
    ids = model.tokenizer.encode(ex.text).ids
    t = len(ids)
    cfg = model.config
    out = forward(model.params, cfg, jnp.asarray([ids], jnp.int32), jnp.arange(t, dtype=jnp.int32)[None],
                  KVCache.zeros(cfg, 1, t), jnp.zeros(1, jnp.int32), causal_mask(1, t))
    with torch.no_grad():
        ref = hf(torch.tensor([ids])).logits.numpy()
    np.testing.assert_allclose(np.asarray(out.logits), ref, atol=1e-4, rtol=1e-4)


def test_tokenizer_round_trips_corpus(model):
    tok = model.tokenizer
    for ex in sql_examples(20, seed=1, split="eval"):
        ids = tok.encode(ex.text).ids
        assert tok.decode(ids) == ex.text
        # The prompt's tokens are a prefix of the full example's: the answer starts on a token boundary.
        prompt_ids = tok.encode(ex.prompt).ids
        assert ids[: len(prompt_ids)] == prompt_ids


def test_greedy_generation_answers_in_sql_over_the_schema(model):
    from specjax.engine.plain import greedy_generate

    prompts = sql_prompts(3, seed=0)
    outs = greedy_generate(model, [model.tokenizer.encode(p).ids for p in prompts], max_new_tokens=48)
    for prompt, out in zip(prompts, outs):
        text = model.tokenizer.decode(out)
        assert text.startswith("SELECT"), text
        tables = _schema_tables(prompt)
        assert tables and any(re.search(rf"\b{t}\b", text) for t in tables), (prompt, text)


def test_corpus_is_deterministic_per_seed():
    a = sql_examples(200, seed=3)
    assert a == sql_examples(200, seed=3)
    assert a != sql_examples(200, seed=4)
    assert sql_examples(50, seed=3, split="demo") != a[:50]
    assert sql_prompts(10, seed=7) == sql_prompts(10, seed=7)


def test_corpus_examples_are_well_formed():
    examples = sql_examples(300, seed=0)
    assert {ex.schema for ex in examples} == set(SCHEMAS)
    for ex in examples:
        assert ex.prompt.startswith("-- schema:\nCREATE TABLE ")
        assert ex.prompt.endswith(f"-- question: {ex.question}\n")
        assert ex.sql.startswith("SELECT ") and ex.sql.endswith(";") and "\n" not in ex.sql
        tables = _schema_tables(ex.prompt)
        assert any(re.search(rf"\bFROM {t}\b", ex.sql) for t in tables), ex.sql
    for p in sql_prompts(5, seed=0):
        assert p.startswith("-- schema:\n") and p.endswith("\n")


def test_training_corpus_is_the_one_the_model_was_trained_on():
    """The generator still yields the exact corpus recorded when the shipped model was built."""
    with open(os.path.join(MODEL_DIR, "training.json")) as f:
        meta = json.load(f)
    examples = sql_examples(meta["num_examples"], meta["seed"], split="train")
    digest = hashlib.sha256("\n\n".join(ex.text for ex in examples).encode()).hexdigest()
    assert digest == meta["corpus_sha256"], "models/embedded/toy_corpus.py changed: rebuild the embedded model"
