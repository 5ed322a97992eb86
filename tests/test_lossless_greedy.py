"""Greedy speculative output equals plain greedy output, token for token."""

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from engine_helpers import OracleTreeDrafter, tiny_model
from specjax.drafters.prompt_lookup import PromptLookupDrafter
from specjax.engine.engine import Engine
from specjax.engine.plain import greedy_generate

MODELS = {"llama": tiny_model(0), "qwen3_tied": tiny_model(1, qk_norm=True, tie=True)}
PROMPTS = [[3, 9, 4, 3, 9], [17, 2, 5, 5, 40, 41, 42, 17, 2, 5, 5], [60, 1, 7]]
NEW_TOKENS = 24
CAPACITY = 8
_REFERENCE_CACHE: dict = {}


def reference(name):
    if name not in _REFERENCE_CACHE:
        outs = greedy_generate(MODELS[name], PROMPTS, NEW_TOKENS)
        _REFERENCE_CACHE[name] = {tuple(p): o for p, o in zip(PROMPTS, outs)}
    return _REFERENCE_CACHE[name]


@st.composite
def tree_shapes(draw):
    """Parent arrays: each node's parent is -1 or an earlier node; chain, wide and deep all reachable."""
    n = draw(st.integers(1, CAPACITY))
    return [draw(st.integers(-1, i - 1)) for i in range(n)]


@pytest.mark.parametrize("name", sorted(MODELS))
@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(shapes=st.lists(tree_shapes(), min_size=1, max_size=4), follow=st.sampled_from([0.3, 0.7, 0.95]),
       seed=st.integers(0, 2**16))
def test_random_trees_are_lossless(name, shapes, follow, seed):
    ref = reference(name)
    drafter = OracleTreeDrafter(ref, shapes, follow, MODELS[name].config.vocab_size, seed)
    engine = Engine(MODELS[name], drafter, draft_capacity=CAPACITY, attention="xla")
    results = engine.generate(PROMPTS, max_new_tokens=NEW_TOKENS)
    for prompt, res in zip(PROMPTS, results):
        assert res.token_ids == ref[tuple(prompt)]


@pytest.mark.parametrize("shape_name,parents", [
    ("chain", list(range(-1, CAPACITY - 1))),
    ("star", [-1] * CAPACITY),
    ("deep_with_padding", [-1, 0, 1, 2]),
])
def test_named_shapes_accept_mixed_lengths_in_one_batch(shape_name, parents):
    ref = reference("llama")
    drafter = OracleTreeDrafter(ref, [parents], 0.8, 64, seed=1)
    engine = Engine(MODELS["llama"], drafter, draft_capacity=CAPACITY, attention="xla")
    results = engine.generate(PROMPTS, max_new_tokens=NEW_TOKENS)
    assert [r.token_ids for r in results] == [ref[tuple(p)] for p in PROMPTS]
    if shape_name != "star":
        assert max(r.tokens_per_pass for r in results) > 1.5  # speculation actually happened


def test_prompt_lookup_is_lossless_and_stops_at_eos():
    eos = greedy_generate(tiny_model(2), PROMPTS, NEW_TOKENS)[1][10]  # a token greedy emits mid-way
    model = tiny_model(2, eos=(eos,))
    expected = greedy_generate(model, PROMPTS, NEW_TOKENS)
    engine = Engine(model, PromptLookupDrafter(max_ngram=3, max_branches=3), draft_capacity=6, attention="xla")
    got = [r.token_ids for r in engine.generate(PROMPTS, max_new_tokens=NEW_TOKENS)]
    assert got == expected
    assert any(len(o) < NEW_TOKENS for o in expected)  # the EOS path was exercised


def test_pallas_tree_attention_in_the_loop_is_lossless():
    """The Pallas kernel (interpret mode on CPU) behind verify and prefill gives the same tokens."""
    engine = Engine(MODELS["llama"], PromptLookupDrafter(max_branches=2), draft_capacity=4, attention="pallas")
    got = [r.token_ids for r in engine.generate(PROMPTS, max_new_tokens=12)]
    assert got == [ref[:12] for ref in (reference("llama")[tuple(p)] for p in PROMPTS)]
