"""What the READMEs say about the embedded tiny-sql model, checked on the shipped files.

Its demo prompts (``specjax generate --seed 0`` to ``9``) and the evaluation questions
behind its exact-match figure are held out from its training corpus, and no demo
answer occurs in the suffix history it ships as "earlier traffic". Each check has a
negative control: the generator the demo used before (the raw "demo"/"eval" streams,
about 3/4 of them training questions) fails it.
"""

import hashlib
import json
import os

import jax.numpy as jnp
import pytest

from specjax.drafters.suffix_history import load_history
from specjax.models.embedded import default_model_dir, embedded_drafter_dir, embedded_suffix_history
from specjax.models.embedded.toy_corpus import held_out_examples, sql_examples, sql_prompts

from engine_helpers import load_benchmark

MODEL_DIR = default_model_dir()
DEMO_SEEDS = range(10)  # the seeds the READMEs promise (256 prompts each; fewer is a prefix)
DEMO_PER_SEED = 256
# What the drafter's training.json names as its prompts.
DRAFTER_PROMPTS = "sql_examples(4000, seed=1000, split='train')"


def _corpus_sha256(examples) -> str:
    return hashlib.sha256("\n\n".join(ex.text for ex in examples).encode()).hexdigest()


def _old_demo_examples(n: int, seed: int):
    """The demo before it was held out: the raw "demo" stream (negative control)."""
    return sql_examples(n, seed, split="demo")


@pytest.fixture(scope="module")
def meta():
    with open(os.path.join(MODEL_DIR, "training.json")) as f:
        return json.load(f)


@pytest.fixture(scope="module")
def training(meta):
    """The shipped model's training examples, regenerated as benchmarks/train_tiny_sql.py does,
    checked against the corpus sha256 recorded in its training.json."""
    examples = sql_examples(meta["num_examples"], meta["seed"], split="train")
    assert _corpus_sha256(examples) == meta["corpus_sha256"], "models/embedded/toy_corpus.py changed: rebuild the model"
    return {ex.prompt for ex in examples}, {(ex.schema, ex.sql) for ex in examples}


def test_the_recorded_corpus_hash_tells_corpora_apart(meta):
    """Negative controls of the fixture's check: a neighbouring seed or one example less is another corpus."""
    n, seed = meta["num_examples"], meta["seed"]
    assert _corpus_sha256(sql_examples(n, seed + 1, split="train")) != meta["corpus_sha256"]
    assert _corpus_sha256(sql_examples(n - 1, seed, split="train")) != meta["corpus_sha256"]


def _seen(examples, training) -> list:
    prompts, answers = training
    return [ex for ex in examples if ex.prompt in prompts or (ex.schema, ex.sql) in answers]


def test_demo_prompts_are_distinct_and_held_out_from_training(training):
    for seed in DEMO_SEEDS:
        examples = held_out_examples(DEMO_PER_SEED, seed, split="demo")
        prompts = sql_prompts(DEMO_PER_SEED, seed)
        assert prompts == [ex.prompt for ex in examples]
        assert len(set(prompts)) == DEMO_PER_SEED, f"seed {seed}: repeated demo prompts"
        assert not _seen(examples, training), f"seed {seed}: demo questions (or their SQL) are training data"
    assert sql_prompts(32, 0) == sql_prompts(DEMO_PER_SEED, 0)[:32]  # the default demo is covered
    old = _old_demo_examples(32, 0)
    assert len({ex.prompt for ex in old}) < 32  # the review found 30 distinct
    assert len(_seen(old, training)) > 16  # the review found 23 training prompts


def test_demo_prompts_are_not_the_shipped_drafters_training_prompts():
    with open(os.path.join(embedded_drafter_dir(), "training.json")) as f:
        assert DRAFTER_PROMPTS in json.load(f)["prompts"]
    drafter_prompts = {ex.prompt for ex in sql_examples(4000, seed=1000, split="train")}
    for seed in DEMO_SEEDS:
        assert not drafter_prompts & set(sql_prompts(DEMO_PER_SEED, seed)), f"seed {seed}"
    assert drafter_prompts & {ex.prompt for ex in _old_demo_examples(32, 0)}  # negative control


def test_evaluation_questions_of_the_exact_match_claim_are_held_out(meta, training):
    script = load_benchmark("train_tiny_sql")
    n = meta["args"]["eval_examples"]
    for count in (n, 256):  # the exact-match questions and the held-out loss's
        examples = script.eval_questions(count, meta["seed"], meta["num_examples"])
        assert len({ex.prompt for ex in examples}) == count
        assert not _seen(examples, training)
    old = sql_examples(n, meta["seed"], split="eval")  # the questions behind the former "53%"
    assert len(_seen(old, training)) > n // 2  # the review found 24 of 32


@pytest.fixture(scope="module")
def history_texts():
    from specjax.models.loading import load_model

    path = embedded_suffix_history()
    assert path is not None, "models/assets/tiny-sql/suffix_history.jsonl.gz is not installed"
    model = load_model(MODEL_DIR, dtype=jnp.float32)
    responses = load_history(path, vocab_size=model.config.vocab_size, tokenizer=model.tokenizer)
    assert len(responses) >= 1000 and all(responses)
    return model, [model.tokenizer.decode(r) for r in responses]


def _occurring(answers, texts) -> list[str]:
    """The answers that occur verbatim in one of ``texts`` (NUL joins them: no answer holds one)."""
    joined = "\0".join(texts)
    return [a for a in answers if a in joined]


def test_no_demo_gold_answer_occurs_in_the_shipped_history(history_texts):
    _, texts = history_texts
    gold = {ex.sql for s in DEMO_SEEDS for ex in held_out_examples(DEMO_PER_SEED, s, split="demo")}
    assert not _occurring(sorted(gold), texts)
    old = {ex.sql for ex in _old_demo_examples(32, 0)}
    assert _occurring(sorted(old), texts)  # negative control: the old demo's (training questions') answers are there


def test_no_greedy_demo_answer_occurs_in_the_shipped_history(history_texts):
    """The model's own answers to the default demo (``--seed 0``, 32 prompts, 64 tokens)."""
    from specjax.engine.engine import Engine

    model, texts = history_texts
    old = [ex.prompt for ex in _old_demo_examples(32, 0)]
    results = Engine(model, None).generate(sql_prompts(32, 0) + old, max_new_tokens=64)
    answers = [model.tokenizer.decode(r.token_ids).strip() for r in results]
    assert all(answers) and not _occurring(answers[:32], texts)
    assert _occurring(answers[32:], texts)  # negative control: answers to the old demo's training questions
