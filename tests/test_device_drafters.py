"""Device-drafter math in isolation: the EAGLE-2 dynamic tree against a brute force, the
draft model's chain against its own greedy decoding, q bookkeeping for sampled rows."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from engine_helpers import tiny_model
from specjax.drafters.device import TreeShape, build_dynamic_tree
from specjax.drafters.draft_model import DraftModelDrafter, VocabMismatchError
from specjax.engine.plain import greedy_generate, pad_prompts
from specjax.engine.tree import validate_tree

V = 23


class Temps:
    def __init__(self, *t):
        self.temperature = jnp.asarray(t, jnp.float32)


def bigram_expand(table):
    """A draft whose next-token logits depend only on the last token (for brute force)."""

    def expand(carry, tokens, feats, positions, offset, scratch_mask):
        return table[tokens], feats, carry

    return expand


def eagle2_reference(logp: np.ndarray, root: int, k: int, depth: int, capacity: int) -> dict:
    """EAGLE-2 in plain Python: {path of tokens: cumulative probability} of the kept nodes."""
    top = lambda tok: np.argsort(-logp[tok])[:k]
    level = [((int(t),), logp[root, t]) for t in top(root)]
    everything = list(level)
    for _ in range(depth - 1):
        frontier = sorted(level, key=lambda c: -c[1])[:k]
        level = [(path + (int(t),), s + logp[path[-1], t]) for path, s in frontier for t in top(path[-1])]
        everything += level
    kept = sorted(everything, key=lambda c: -c[1])[:capacity]
    return {path: float(np.exp(s)) for path, s in kept}


def tree_paths(tokens, parents, valid, probs) -> dict:
    out = {}
    for i in np.flatnonzero(valid):
        path, j = [], i
        while j != -1:
            path.append(int(tokens[j]))
            j = parents[j]
        out[tuple(reversed(path))] = float(probs[i])
    return out


@pytest.mark.parametrize("k, depth, capacity", [(3, 4, 10), (2, 2, 8), (1, 5, 5), (4, 3, 30)])
def test_dynamic_tree_equals_brute_force(k, depth, capacity):
    rng = np.random.default_rng(k * 10 + depth)
    table = jnp.asarray(rng.normal(0, 2, (V, V)), jnp.float32)
    roots = np.array([3, 11, 0])
    root_logits = table[roots]
    shape = TreeShape(capacity, k, depth)
    build = jax.jit(lambda t, r: build_dynamic_tree(bigram_expand(t), jnp.zeros(()), r, jnp.zeros((3, 1)),
                                                    jnp.zeros(3, jnp.int32), shape, jnp.zeros(3),
                                                    jax.random.key(0), jnp.zeros(3, jnp.int32))[0])
    tree = build(table, root_logits)
    validate_tree(tree, V)
    logp = np.asarray(jax.nn.log_softmax(table, axis=-1), np.float64)
    for b, root in enumerate(roots):
        got = tree_paths(*(np.asarray(x[b]) for x in (tree.tokens, tree.parents, tree.valid, tree.draft_probs)))
        want = eagle2_reference(logp, int(root), k, depth, capacity)
        assert got.keys() == want.keys()
        np.testing.assert_allclose([got[p] for p in want], list(want.values()), rtol=1e-5)
    assert int(tree.valid.sum()) == 3 * min(capacity, shape.num_candidates)


def test_sampled_rows_carry_the_q_their_children_came_from():
    """Row 0 greedy (top-k children, as the brute force), row 1 sampled at T = 0.7: every expanded
    node's q_dists row is the draft's softmax at that temperature."""
    rng = np.random.default_rng(5)
    table = jnp.asarray(rng.normal(0, 2, (V, V)), jnp.float32)
    roots = np.array([4, 9])
    k, depth, capacity = 3, 3, 12
    build = jax.jit(lambda t, r: build_dynamic_tree(
        bigram_expand(t), jnp.zeros(()), r, jnp.zeros((2, 1)), jnp.zeros(2, jnp.int32), TreeShape(capacity, k, depth),
        jnp.asarray([0.0, 0.7]), jax.random.key(1), jnp.zeros(2, jnp.int32), with_q=True)[0])
    tree = build(table, table[roots])
    validate_tree(tree, V)
    assert tree.q_dists.shape == (2, capacity + 1, V)
    logp = np.asarray(jax.nn.log_softmax(table, axis=-1), np.float64)
    greedy = tree_paths(*(np.asarray(x[0]) for x in (tree.tokens, tree.parents, tree.valid, tree.draft_probs)))
    assert greedy.keys() == eagle2_reference(logp, 4, k, depth, capacity).keys()
    q = np.asarray(jax.nn.softmax(table / 0.7, axis=-1))
    tokens, parents, valid = (np.asarray(x[1]) for x in (tree.tokens, tree.parents, tree.valid))
    np.testing.assert_allclose(np.asarray(tree.q_dists[1, 0]), q[roots[1]], atol=1e-6)
    expanded = {int(p) for p, v in zip(parents, valid) if v and p >= 0}
    assert expanded, "the sampled tree should have depth > 1"
    for i in expanded:
        np.testing.assert_allclose(np.asarray(tree.q_dists[1, i + 1]), q[tokens[i]], atol=1e-6)
    # Whole sibling groups in draw order: each expanded node keeps k children, except at most
    # one group cut by the capacity (the last one kept).
    sizes = sorted(int(((parents == p) & valid).sum()) for p in [-1, *expanded])
    assert sizes[1:] == [k] * (len(sizes) - 1)


def test_chain_is_the_draft_models_greedy_continuation():
    draft = tiny_model(0, vocab=64)
    prompts = [[5, 17, 33, 8], [9, 42, 61, 7, 7, 3, 30, 11, 12]]
    ref = greedy_generate(draft, prompts, 7, stop_at_eos=False)
    drafter = DraftModelDrafter(draft, 64, capacity=6)
    tokens, lengths = pad_prompts(prompts, 64)
    first = jnp.asarray([r[0] for r in ref])
    dstate = jax.jit(drafter.prefill)(drafter.params, drafter.init_state(2, 64), jnp.asarray(tokens),
                                      jnp.asarray(lengths), first)
    propose = jax.jit(lambda p, d, f, n: drafter.propose(p, d, f, n, Temps(0.0, 0.0), jax.random.key(0)))
    tree, _ = propose(drafter.params, dstate, first, jnp.asarray(lengths))
    assert np.asarray(tree.tokens).tolist() == [r[1:7] for r in ref]
    assert np.asarray(tree.parents).tolist() == [[-1, 0, 1, 2, 3, 4]] * 2


def test_vocab_mismatch_names_both_sizes():
    with pytest.raises(VocabMismatchError, match="draft model vocab_size 64 != target vocab_size 97"):
        DraftModelDrafter(tiny_model(0, vocab=64), 97)


def test_load_drafter_builds_device_drafters():
    from specjax.drafters.device import is_device_drafter
    from specjax.drafters.factory import load_drafter

    target = tiny_model(0, vocab=64)
    drafter = load_drafter("token-recycling", target, max_draft_capacity=16)
    assert is_device_drafter(drafter) and drafter.capacity == 80
    assert not is_device_drafter(load_drafter("suffix"))
    with pytest.raises(ValueError, match="--drafter eagle3 needs --drafter-model"):
        load_drafter("eagle3", target)  # not the embedded model: no shipped weights
    with pytest.raises(ValueError, match="needs the target model"):
        load_drafter("draft-model")
