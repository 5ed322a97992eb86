"""accept() on hand-built logits and trees."""

import jax
import jax.numpy as jnp
import numpy as np

from specjax.engine.sampling import SamplingParams
from specjax.engine.state import DecodeState
from specjax.engine.steps import accept
from specjax.engine.tree import DraftTree
from specjax.models.decoder import KVCache

V = 10


def _state(b=1, length=3, last=7, remaining=50):
    # The cache's slot values encode their slot index so compaction is observable.
    slots = jnp.arange(32, dtype=jnp.float32)
    k = jnp.broadcast_to(slots[None, None, None, :, None], (1, b, 1, 32, 2))
    return DecodeState(cache=KVCache(k, k + 100), lengths=jnp.full(b, length, jnp.int32),
                       last_tokens=jnp.full(b, last, jnp.int32), remaining=jnp.full(b, remaining, jnp.int32),
                       finished=jnp.zeros(b, bool), rng=jax.random.key(0),
                       sampling=SamplingParams.make(b))


def _logits(choices):
    """Logits whose argmax at node n (root-indexed) is choices[n]."""
    return jnp.asarray(np.eye(V, dtype=np.float32)[choices] * 5.0)[None]


def _tree(tokens, parents):
    return DraftTree(jnp.asarray([tokens], jnp.int32), jnp.asarray([parents], jnp.int32),
                     jnp.ones((1, len(tokens)), bool))


def test_all_accepted_chain_emits_drafts_and_bonus_and_compacts():
    tree = _tree([1, 2, 3], [-1, 0, 1])
    state, out = accept(_state(), tree, _logits([1, 2, 3, 4]))
    assert out.num.tolist() == [4] and out.tokens[0].tolist() == [1, 2, 3, 4]
    assert out.num_draft_accepted.tolist() == [3]
    assert state.lengths.tolist() == [7] and state.last_tokens.tolist() == [4]
    assert np.asarray(state.cache.k)[0, 0, 0, 3:7, 0].tolist() == [3, 4, 5, 6]


def test_none_accepted_emits_only_the_bonus():
    tree = _tree([1, 2, 3], [-1, 0, 1])
    state, out = accept(_state(), tree, _logits([5, 2, 3, 4]))
    assert out.num.tolist() == [1] and out.tokens[0, 0] == 5
    assert state.lengths.tolist() == [4] and state.last_tokens.tolist() == [5]


def test_branch_switch_at_depth_two_takes_the_agreeing_sibling():
    # Root children: node0=1, node1=9; node0's children: node2=2 (wrong), node3=6 (right).
    # node3 has child node4=8 (right). Target: root->1, 1->6, 6->8, 8->3.
    tree = _tree([1, 9, 2, 6, 8], [-1, -1, 0, 0, 3])
    choices = [1, 6, 0, 0, 8, 3]  # root, node0..node4 (root-indexed)
    state, out = accept(_state(), tree, _logits(choices))
    assert out.tokens[0, : out.num[0]].tolist() == [1, 6, 8, 3]
    # The accepted path is root-indexed nodes 1, 4, 5: slots 3+1, 3+4, 3+5 move to 4, 5, 6.
    assert np.asarray(state.cache.k)[0, 0, 0, 3:7, 0].tolist() == [3, 4, 7, 8]
    assert np.asarray(state.cache.v)[0, 0, 0, 3:7, 0].tolist() == [103, 104, 107, 108]


def test_eos_inside_accepted_path_stops_there():
    tree = _tree([1, 2, 3], [-1, 0, 1])
    state, out = accept(_state(), tree, _logits([1, 2, 3, 4]), eos_ids=(2,))
    assert out.num.tolist() == [2] and out.tokens[0, :2].tolist() == [1, 2]
    assert state.finished.tolist() == [True]


def test_budget_truncates_and_finished_sequences_emit_nothing():
    tree = DraftTree(jnp.asarray([[1, 2, 3]] * 2, jnp.int32), jnp.asarray([[-1, 0, 1]] * 2, jnp.int32),
                     jnp.ones((2, 3), bool))
    st = _state(b=2, remaining=2)
    st = st.replace(finished=jnp.asarray([False, True]))
    logits = jnp.concatenate([_logits([1, 2, 3, 4])] * 2)
    state, out = accept(st, tree, logits)
    assert out.num.tolist() == [2, 0]
    assert state.finished.tolist() == [True, True] and state.lengths.tolist() == [5, 3]


def test_invalid_slots_are_never_accepted():
    tree = DraftTree(jnp.asarray([[1, 2]], jnp.int32), jnp.asarray([[-1, 0]], jnp.int32),
                     jnp.asarray([[True, False]]))
    _, out = accept(_state(), tree, _logits([1, 2, 3]))
    assert out.tokens[0, : out.num[0]].tolist() == [1, 2]  # node1 invalid: 2 comes as the bonus
    assert out.num_draft_accepted.tolist() == [1]


def test_capacity_zero_tree_is_one_plain_step():
    tree = DraftTree(jnp.zeros((1, 0), jnp.int32), jnp.zeros((1, 0), jnp.int32), jnp.zeros((1, 0), bool))
    state, out = accept(_state(), tree, _logits([4]))
    assert out.num.tolist() == [1] and out.tokens[0, 0] == 4 and state.lengths.tolist() == [4]
