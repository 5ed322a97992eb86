"""Speculative sampling keeps the target's distribution (chi-square against exact enumeration).

On a 6-token vocab we enumerate the exact joint distribution of the 2nd and 3rd
generated tokens (the first ones produced by speculative steps) and compare the
empirical distribution of many speculative samples with it. A negative control
shows the test has the power to catch a wrong residual.
"""

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import stats

from engine_helpers import tiny_model
from specjax.engine.sampling import Sampling, target_probs
from specjax.engine.steps import accept, prefill, verify
from specjax.engine.tree import DraftTree
from specjax.models.decoder import KVCache, causal_mask, forward

V = 6
MODEL = tiny_model(3, vocab=V)
PROMPT = [1, 2, 3]
N = 4000
PARENTS = np.array([-1, -1, -1, 0, 1, 2], np.int32)  # three root children, one child each


def exact_pair_distribution(sampling: Sampling) -> np.ndarray:
    """P(t2, t3) = sum_t1 P(t1) P(t2 | t1) P(t3 | t1, t2), by running every continuation."""
    seqs = np.array([PROMPT + [a, b] for a, b in itertools.product(range(V), repeat=2)])
    b, t = seqs.shape
    out = forward(MODEL.params, MODEL.config, jnp.asarray(seqs), jnp.broadcast_to(jnp.arange(t), (b, t)),
                  KVCache.zeros(MODEL.config, b, t), jnp.zeros(b, jnp.int32), causal_mask(b, t))
    probs = np.asarray(target_probs(out.logits, sampling), np.float64).reshape(V, V, t, V)
    p1 = probs[0, 0, len(PROMPT) - 1]  # [t1]
    p2 = probs[:, 0, len(PROMPT)]  # [t1, t2]
    p3 = probs[:, :, len(PROMPT) + 1]  # [t1, t2, t3]
    return np.einsum("a,ab,abc->bc", p1, p2, p3)


def sample_pairs(sampling: Sampling, make_tree, seed: int) -> np.ndarray:
    """Run prefill + speculative steps for N copies of the prompt; return (t2, t3) per copy."""
    cfg = MODEL.config
    tokens = jnp.asarray([PROMPT] * N, jnp.int32)
    state, first = prefill(MODEL.params, cfg, tokens, jnp.full(N, len(PROMPT), jnp.int32),
                           jnp.full(N, 3, jnp.int32), jax.random.key(seed), sampling=sampling, max_len=32)
    outputs = [[int(t)] for t in np.asarray(first)]
    rng = np.random.default_rng(seed)
    while min(len(o) for o in outputs) < 3:
        tree = make_tree(rng)
        state, logits, _ = verify(MODEL.params, state, tree, cfg=cfg)
        state, acc = accept(state, tree, logits, sampling=sampling)
        emitted, num = jax.device_get((acc.tokens, acc.num))
        for i in range(N):
            outputs[i].extend(emitted[i, : num[i]].tolist())
    return np.array([o[1:3] for o in outputs])


def point_mass_tree(rng) -> DraftTree:
    return DraftTree(jnp.asarray(rng.integers(0, V, (N, len(PARENTS))), jnp.int32),
                     jnp.asarray(np.broadcast_to(PARENTS, (N, len(PARENTS)))), jnp.ones((N, len(PARENTS)), bool))


Q_ROOT = np.array([0.4, 0.3, 0.1, 0.1, 0.05, 0.05])
Q_CHILD = np.array([0.05, 0.05, 0.1, 0.2, 0.3, 0.3])


def sampled_tree(rng, q_root=Q_ROOT, q_child=Q_CHILD, claimed_q=None) -> DraftTree:
    """Children drawn i.i.d. from q; ``claimed_q`` lets the control lie about q."""
    roots = rng.choice(V, size=(N, 3), p=q_root)
    kids = rng.choice(V, size=(N, 3), p=q_child)
    q = np.concatenate([np.broadcast_to(q_root, (N, 1, V)), np.broadcast_to(q_child, (N, 3, V)),
                        np.full((N, 3, V), 1.0 / V)], axis=1)
    if claimed_q is not None:
        q = np.broadcast_to(claimed_q, q.shape)
    return DraftTree(jnp.asarray(np.concatenate([roots, kids], 1), jnp.int32),
                     jnp.asarray(np.broadcast_to(PARENTS, (N, len(PARENTS)))), jnp.ones((N, len(PARENTS)), bool),
                     q_dists=jnp.asarray(q, jnp.float32))


def chi_square_p(pairs: np.ndarray, expected: np.ndarray) -> float:
    observed = np.zeros((V, V))
    np.add.at(observed, (pairs[:, 0], pairs[:, 1]), 1)
    exp = expected.ravel() * len(pairs)
    obs = observed.ravel()
    keep = exp >= 5  # merge sparse cells into one bucket
    obs = np.append(obs[keep], obs[~keep].sum())
    exp = np.append(exp[keep], exp[~keep].sum())
    if exp[-1] == 0:
        obs, exp = obs[:-1], exp[:-1]
    return stats.chisquare(obs, exp * obs.sum() / exp.sum()).pvalue


SAMPLINGS = [Sampling(temperature=1.0), Sampling(temperature=0.8, top_k=4, top_p=0.9)]


@pytest.mark.parametrize("sampling", SAMPLINGS, ids=["t1", "topk_topp"])
def test_point_mass_drafts_keep_the_distribution(sampling):
    pairs = sample_pairs(sampling, point_mass_tree, seed=0)
    assert chi_square_p(pairs, exact_pair_distribution(sampling)) > 1e-3


@pytest.mark.parametrize("sampling", SAMPLINGS, ids=["t1", "topk_topp"])
def test_q_sampled_drafts_keep_the_distribution(sampling):
    pairs = sample_pairs(sampling, sampled_tree, seed=1)
    assert chi_square_p(pairs, exact_pair_distribution(sampling)) > 1e-3


def test_a_wrong_residual_is_detected():
    """Control: drafts from Q_ROOT/Q_CHILD but acceptance told q is uniform -> biased output."""
    sampling = SAMPLINGS[0]
    pairs = sample_pairs(sampling, lambda rng: sampled_tree(rng, claimed_q=np.full(V, 1.0 / V)), seed=2)
    assert chi_square_p(pairs, exact_pair_distribution(sampling)) < 1e-6
