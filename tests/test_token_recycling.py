"""Token Recycling: the paper's template, drafting as gathers along it, table updates from
every scored node."""

import dataclasses
import types

import jax.numpy as jnp
import numpy as np
import pytest

from specjax.drafters.token_recycling import PAPER_TREE, TokenRecyclingDrafter, TreeTemplate
from specjax.engine.tree import validate_tree

V = 50


def test_paper_template_shape():
    t = TreeTemplate.from_paths(PAPER_TREE)
    assert len(t) == 80
    assert np.bincount(t.depth).tolist() == [0, 8, 21, 25, 15, 8, 3]
    assert t.ranks.max() == 7
    assert all(p < i for i, p in enumerate(t.parents))


def test_template_must_be_closed_under_prefixes():
    with pytest.raises(ValueError, match="parents missing"):
        TreeTemplate.from_paths([(0,), (1, 0, 0)])


def test_drafting_gathers_successors_along_the_template():
    drafter = TokenRecyclingDrafter(V, capacity=80)
    table = (np.arange(V)[:, None] * 3 + np.arange(8)[None, :] + 1) % V
    table[7] = -1  # token 7 was never scored: its subtree stays empty
    dstate = drafter.init_state(2)
    dstate = dataclasses.replace(dstate, table=jnp.asarray(table, jnp.int32))
    roots = np.array([2, 7])
    tree, _ = drafter.propose(None, dstate, jnp.asarray(roots), None, None, None)
    validate_tree(tree, V)
    t = drafter.template
    tokens, valid = np.asarray(tree.tokens), np.asarray(tree.valid)
    for i in range(80):
        parent_token = roots[0] if t.parents[i] < 0 else tokens[0, t.parents[i]]
        parent_ok = t.parents[i] < 0 or valid[0, t.parents[i]]
        assert valid[0, i] == (parent_ok and parent_token != 7)
        if valid[0, i]:
            assert tokens[0, i] == table[parent_token, t.ranks[i]]
    assert 0 < valid[0].sum() < 80
    assert not valid[1].any()


def test_update_takes_topk_of_every_scored_node():
    drafter = TokenRecyclingDrafter(V, capacity=3, k=2, paths=[(0,), (1,), (0, 0)])
    dstate = drafter.init_state(2)
    tree_tokens = jnp.asarray([[5, 6, 7, 8], [9, 10, 11, 12]], jnp.int32)
    valid = jnp.asarray([[True, True, False, True], [True, True, True, True]])
    dstate = dataclasses.replace(dstate, tree_tokens=tree_tokens, tree_valid=valid)
    logits = np.random.default_rng(0).normal(size=(2, 4, V)).astype(np.float32)
    accepted = types.SimpleNamespace(tokens=jnp.asarray([[6, 30, 0, 0], [0, 0, 0, 0]]),
                                     num=jnp.asarray([2, 0]))  # row 1 finished: it teaches nothing
    new = drafter.update(None, dstate, accepted, types.SimpleNamespace(logits=jnp.asarray(logits)))
    table = np.asarray(new.table)
    top2 = np.argsort(-logits, axis=-1)[..., :2]
    for node, token in enumerate([5, 6, 7, 8]):
        expected = top2[0, node] if valid[0, node] else [-1, -1]
        assert table[token].tolist() == list(expected)
    assert (table[[9, 10, 11, 12]] == -1).all()
    expected_p = np.exp(np.sort(logits, axis=-1)[..., ::-1][..., :2] - np.log(np.exp(logits).sum(-1))[..., None])
    np.testing.assert_allclose(np.asarray(new.table_probs)[6], expected_p[0, 1], rtol=1e-5)
    # The next step's root is each row's last emitted token (a finished row keeps its root).
    assert np.asarray(new.tree_tokens[:, 0]).tolist() == [30, 9]
    assert not np.asarray(new.tree_valid[:, 1:]).any()


def test_the_table_outlives_the_batch():
    drafter = TokenRecyclingDrafter(V)
    dstate = drafter.init_state(1)
    drafter.end_batch(dataclasses.replace(dstate, table=dstate.table.at[3].set(1)))
    assert int(drafter.init_state(4).table[3, 0]) == 1
    drafter.reset()
    assert int(drafter.init_state(4).table[3, 0]) == -1
