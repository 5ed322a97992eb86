"""The raw steps as a JAX researcher calls them: strict, documented contracts (issue 26).

Plain decoding pads long prompts as the Engine does; ``step`` / ``accept`` stop at the
model's EOS by default; the Engine's length checks use the real prompt length; the raw
``prefill`` refuses bad input; a donated state gets an error naming ``fork``; ``prefill`` /
``extend`` return one ``Prefilled`` shape, with the last position's logits on request.
"""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from engine_helpers import tiny_model
from specjax.drafters.prompt_lookup import PromptLookupDrafter
from specjax.engine.engine import Engine
from specjax.engine.plain import generate_plain, greedy_generate
from specjax.engine.sampling import SamplingParams
from specjax.engine.state import fork
from specjax.engine.steps import Prefilled, accept, extend, prefill, step, verify
from specjax.engine.tree import DraftTree, empty_tree
from specjax.models.decoder import KVCache, causal_mask, forward
from specjax.models.loading import Model

MODEL = tiny_model(7)
CFG = MODEL.config


def _with_config(model: Model, **changes) -> Model:
    return dataclasses.replace(model, config=dataclasses.replace(model.config, **changes))


def _prompt(n: int, seed: int = 0) -> list[int]:
    return np.random.default_rng(seed).integers(1, CFG.vocab_size, n).tolist()


def _prefill(model: Model, prompts: list[list[int]], max_new_tokens: int, max_len: int = 128, **kwargs) -> Prefilled:
    width = max(len(p) for p in prompts)
    tokens = np.array([p + [0] * (width - len(p)) for p in prompts], np.int32)
    lengths = np.array([len(p) for p in prompts], np.int32)
    return prefill(model.params, model.config, tokens, lengths, np.full(len(prompts), max_new_tokens, np.int32),
                   jax.random.key(0), SamplingParams.make(len(prompts)), max_len=max_len, attention="xla", **kwargs)


def _chain(tokens: list[int], capacity: int) -> DraftTree:
    """One row: a chain over ``tokens`` (at most ``capacity``), the rest of the slots unused."""
    n = min(len(tokens), capacity)
    ids = np.zeros((1, capacity), np.int32)
    ids[0, :n] = tokens[:n]
    return DraftTree(ids, np.arange(-1, capacity - 1, dtype=np.int32)[None], (np.arange(capacity) < n)[None])


# ------------------------------------------------------------------ plain decoding pads like the Engine


def test_plain_decoding_handles_a_long_prompt_that_is_not_a_chunk_multiple():
    """600 tokens > the 512-token prefill chunk: plain decoding used to pad to a multiple of 8 and
    be refused by prefill; it now pads to the Engine's prompt bucket."""
    model = _with_config(MODEL, max_position_embeddings=2048)
    prompts = [_prompt(600, seed=1), _prompt(37, seed=2)]
    plain = generate_plain(model, prompts, 6)
    assert [len(o) for o in plain] == [6, 6]
    assert plain == [r.token_ids for r in Engine(model, None, attention="xla").generate(prompts, max_new_tokens=6)]
    drafted = Engine(model, PromptLookupDrafter(), draft_capacity=4, attention="xla").generate(prompts, 6)
    assert [r.token_ids for r in drafted] == plain


# ------------------------------------------------------------------ EOS by default


def _stopping_model(prompt: list[int], budget: int) -> tuple[Model, list[int], int]:
    """MODEL with an EOS id that greedy decoding of ``prompt`` first emits as its k-th token (k >= 4)."""
    free_run = greedy_generate(MODEL, [prompt], budget, stop_at_eos=False)[0]
    k = next(i for i in range(4, budget) if free_run[i] not in free_run[:i])
    return _with_config(MODEL, eos_token_ids=(free_run[k],)), free_run, k


def test_raw_steps_stop_at_the_models_eos_by_default():
    prompt, budget = _prompt(12, seed=3), 24
    model, free_run, k = _stopping_model(prompt, budget)
    expected = greedy_generate(model, [prompt], budget)[0]
    assert expected == free_run[: k + 1]  # greedy decoding stops after the EOS token

    def run(eos_override: dict) -> list[int]:
        prefilled = _prefill(model, [prompt], budget)
        state, out = prefilled.state, [int(prefilled.first_tokens[0])]
        while not bool(state.finished[0]):  # drafts from the free run: EOS lands inside accepted chains
            tree = _chain(free_run[len(out):], 3)
            state, acc = step(model.params, state, tree, cfg=model.config, **eos_override)
            out += acc.tokens[0, : acc.num[0]].tolist()
        return out

    assert run({}) == expected
    assert run({"eos_ids": ()}) == free_run  # negative control: an explicit override still wins

    prefilled = _prefill(model, [prompt], budget)
    state, out = prefilled.state, [int(prefilled.first_tokens[0])]
    assert state.eos_ids == model.config.eos_token_ids  # the state carries the config's EOS ids
    while not bool(state.finished[0]):
        tree = _chain(free_run[len(out):], 3)
        state, logits, _ = verify(model.params, state, tree, cfg=model.config)
        state, acc = accept(state, tree, logits)  # no eos_ids: the state's
        out += acc.tokens[0, : acc.num[0]].tolist()
    assert out == expected


# ------------------------------------------------------------------ length checks use the real prompt length


@pytest.mark.parametrize("drafter,capacity", [(None, 0), (PromptLookupDrafter, 4)])
def test_a_request_that_fits_is_not_refused_for_its_padding(drafter, capacity):
    """230 prompt tokens pad to 256 (chunk 64); 230 + 8 new tokens fit max_position_embeddings = 256,
    although the padded width + 8 does not. The padded prompt fills the cache bucket exactly."""
    model = _with_config(MODEL, max_position_embeddings=256)
    prompts = [_prompt(230, seed=4), _prompt(100, seed=5)]
    engine = Engine(model, drafter and drafter(), draft_capacity=capacity, attention="xla", prefill_chunk=64)
    assert engine.prompt_bucket(230) == 256 and engine.cache_bucket(230, 8) == 256
    results = engine.generate(prompts, max_new_tokens=8)
    assert [r.token_ids for r in results] == greedy_generate(model, prompts, 8)
    with pytest.raises(ValueError, match=r"prompt \(230 tokens\) \+ max_new_tokens \(27\) exceeds"):
        engine.generate(prompts, max_new_tokens=27)  # negative control: 257 > 256 is still refused


# ------------------------------------------------------------------ the raw prefill checks concrete input


@pytest.mark.parametrize("tokens,lengths,budget,message", [
    ([[1, 2, CFG.vocab_size]], [3], [4], r"token id 64 at position 2 is outside the vocab \[0, 64\)"),
    ([[1, -1, 3]], [3], [4], r"token id -1 at position 1 is outside the vocab"),
    ([[1, 2, 3]], [4], [4], r"prompt length 4 is outside \[1, 3\]"),
    ([[1, 2, 3]], [0], [4], r"prompt length 0 is outside"),
    ([[1, 2, 3]], [3], [0], r"max_new_tokens must be >= 1"),
    ([[1.0, 2.0]], [2], [4], r"integer ids"),
    ([[1, 2, 3]], [3, 3], [4], r"lengths must have shape \[1\]"),
])
def test_prefill_refuses_bad_input_naming_the_problem(tokens, lengths, budget, message):
    with pytest.raises(ValueError, match=message):
        prefill(MODEL.params, CFG, np.asarray(tokens), np.asarray(lengths), np.asarray(budget), jax.random.key(0),
                SamplingParams.make(len(tokens)), max_len=64)


def test_prefill_refuses_a_prompt_past_max_position_embeddings():
    model = _with_config(MODEL, max_position_embeddings=100)
    with pytest.raises(ValueError, match=r"101 tokens \(0 cached \+ 101 new\) exceed .*max_position_embeddings"):
        _prefill(model, [_prompt(101)], 4, max_len=256)
    assert _prefill(model, [_prompt(100)], 4, max_len=256).first_tokens.shape == (1,)  # the limit itself runs


def test_prefill_checks_real_lengths_against_the_cache():
    with pytest.raises(ValueError, match="do not fit a cache of 64 slots"):
        _prefill(MODEL, [_prompt(64)], 4, max_len=64)  # no slot for the first new token
    with pytest.raises(ValueError, match=r"prompt width 65 \(padded\) does not fit"):
        _prefill(MODEL, [_prompt(65)], 4, max_len=64)
    padded = np.zeros((1, 64), np.int32)
    padded[0, :40] = _prompt(40)
    out = prefill(MODEL.params, CFG, padded, np.array([40]), np.array([4]), jax.random.key(0),
                  SamplingParams.make(1), max_len=64)  # padding up to the last slot is fine
    assert int(out.state.lengths[0]) == 40


def test_validation_is_what_refuses_and_traced_inputs_are_never_read():
    bad = np.array([[1, 2, CFG.vocab_size]], np.int32)
    args = (np.array([3]), np.array([4]), jax.random.key(0), SamplingParams.make(1))
    # Negative control: unchecked, the bad id runs silently (the bug the check closes).
    assert prefill(MODEL.params, CFG, bad, *args, max_len=64, validate=False).first_tokens.shape == (1,)
    # Inside the caller's jit the values are unknown: no check, no error, no host read.
    first = jax.jit(lambda t: prefill(MODEL.params, CFG, t, *args, max_len=64).first_tokens)(jnp.asarray(bad))
    assert first.shape == (1,)


# ------------------------------------------------------------------ donated states and fork


def test_fork_tries_several_trees_from_one_state_and_reuse_names_fork():
    prompt = _prompt(10, seed=6)
    truth = greedy_generate(MODEL, [prompt], 8)[0]
    right, wrong = _chain(truth[1:4], 3), _chain([(t + 1) % CFG.vocab_size for t in truth[1:4]], 3)
    state = _prefill(MODEL, [prompt], 8).state

    _, acc_right = step(MODEL.params, fork(state), right, cfg=CFG)
    _, acc_wrong = step(MODEL.params, fork(state), wrong, cfg=CFG)
    last, acc_last = step(MODEL.params, state, right, cfg=CFG)  # the original itself, donated now
    assert acc_right.tokens[0, : acc_right.num[0]].tolist() == truth[1:5]  # 3 drafts + bonus
    assert acc_wrong.tokens[0, : acc_wrong.num[0]].tolist() == truth[1:2]  # bonus only
    assert acc_last.tokens[0, : acc_last.num[0]].tolist() == truth[1:5]  # the forks left it intact

    tree = empty_tree(1, 3)
    for call in (lambda: step(MODEL.params, state, tree, cfg=CFG), lambda: verify(MODEL.params, state, tree, cfg=CFG),
                 lambda: accept(state, tree, jnp.zeros((1, 4, CFG.vocab_size)))):
        with pytest.raises(ValueError, match=r"donated to an earlier step .* fork\(state\)"):
            call()
    with pytest.raises(ValueError, match="fork"):
        extend(MODEL.params, CFG, state.cache, np.array([10]), np.array([[1]]), np.array([1]), np.array([4]),
               jax.random.key(0), SamplingParams.make(1))
    assert int(last.lengths[0]) == 14  # the returned state is the live one


def test_the_donation_guard_passes_traced_states():
    """Inside the caller's own jit the state is traced: the guard must not touch it."""
    state = _prefill(MODEL, [_prompt(10)], 8).state
    shapes = jax.eval_shape(lambda s: step(MODEL.params, s, empty_tree(1, 2), cfg=CFG)[1].num, state)
    assert shapes.shape == (1,)
    assert not state.cache.k.is_deleted()


# ------------------------------------------------------------------ fixed return types, logits on request


def _reference_logits(prompts: list[list[int]]) -> np.ndarray:
    """Logits [B, W, V] of every position from one uncached causal pass over the right-padded prompts
    (padding sits after each prompt, so it never changes a real position's logits)."""
    width = max(len(p) for p in prompts)
    tokens = jnp.asarray([p + [0] * (width - len(p)) for p in prompts])
    b = len(prompts)
    run = jax.jit(forward, static_argnums=1)  # one program, not op-by-op dispatch
    return np.asarray(run(MODEL.params, CFG, tokens, jnp.broadcast_to(jnp.arange(width), (b, width)),
                          KVCache.zeros(CFG, b, width), jnp.zeros(b, jnp.int32), causal_mask(b, width)).logits)


def test_prefill_returns_one_shape_and_the_last_positions_logits():
    prompts = [_prompt(9, seed=7), _prompt(5, seed=8)]
    plain = _prefill(MODEL, prompts, 4)
    assert isinstance(plain, Prefilled) and plain.hidden is None and plain.logits is None
    full = _prefill(MODEL, prompts, 4, hidden_layers=(0, 2), return_logits=True)
    assert full.hidden.shape == (2, 2, 9, CFG.hidden_size)
    assert full.logits.shape == (2, CFG.vocab_size) and full.logits.dtype == jnp.float32
    every = _reference_logits(prompts)
    last = every[[0, 1], [8, 4]]
    np.testing.assert_allclose(np.asarray(full.logits), last, atol=2e-4)
    # Negative controls: the padded width's last position, or the first position, is not it.
    assert not np.allclose(np.asarray(full.logits)[1], every[1, 8], atol=1e-2)
    assert not np.allclose(np.asarray(full.logits), every[:, 0], atol=1e-2)
    assert np.asarray(full.first_tokens).tolist() == last.argmax(-1).tolist()


def test_extend_returns_the_same_shape_and_continues_the_cache():
    first_part, second_part = _prompt(7, seed=9), _prompt(5, seed=10)
    state = _prefill(MODEL, [first_part], 4).state
    out = extend(MODEL.params, CFG, state.cache, np.array([7]), np.array([second_part + [0, 0, 0]]), np.array([5]),
                 np.array([4]), jax.random.key(0), SamplingParams.make(1), return_logits=True)
    assert isinstance(out, Prefilled) and out.hidden is None
    np.testing.assert_allclose(np.asarray(out.logits), _reference_logits([first_part + second_part])[:, -1], atol=2e-4)
    assert int(out.state.lengths[0]) == 12
