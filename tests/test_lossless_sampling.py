"""Speculative sampling keeps the target's distribution (chi-square against exact enumeration).

On a 6-token vocab we enumerate the exact joint distribution of the 2nd and 3rd
generated tokens (the first ones produced by speculative steps) and compare the
empirical distribution of many speculative samples with it.

The drafts are built from the exact target tables, so they are often the
target's likely tokens: acceptance, rejection and the bonus draw all matter,
and a wrong rule biases the output instead of averaging out. Three plausible
wrong tree walks (copies of ``steps._sampled_walk`` with one rule about the
per-position noise changed) are kept as negative controls that the same test
must reject; a drafter that lies about q must not change the distribution.
``Engine.generate`` is checked end to end with
greedy and sampled prompts (different settings per prompt) in one batch.
"""

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax
from scipy import stats

import specjax.engine.steps as steps
from engine_helpers import tiny_model
from specjax.drafters.base import Proposal
from specjax.engine.engine import Engine
from specjax.engine.sampling import SamplingParams, gumbel_argmax, position_keys, target_probs
from specjax.engine.steps import prefill, step
from specjax.engine.tree import DraftTree
from specjax.models.decoder import KVCache, causal_mask, forward

V = 6
MODEL = tiny_model(3, vocab=V)
PROMPT = [1, 2, 3]
N = 2048  # rows per run: every (t2, t3) cell with mass >= 1/400 expects >= 5 samples
# The engine test's shapes (batch, padded prompt, cache, tree capacity), so that test and the
# step-level runs share one compiled prefill and one compiled step.
PROMPT_WIDTH, MAX_LEN = 16, 128
REAL_CODE_P = 1e-4  # the real code must pass at this level; the controls must fail at 1e-6
CONTROL_P = 1e-6

T1 = dict(temperature=1.0)
FILTERED = dict(temperature=0.8, top_k=4, top_p=0.9)


@jax.jit
def _all_continuation_logits() -> jax.Array:
    """Logits [V * V, len(PROMPT) + 2, V] of the prompt followed by every pair (t1, t2)."""
    seqs = jnp.array([PROMPT + [a, b] for a, b in itertools.product(range(V), repeat=2)])
    b, t = seqs.shape
    return forward(MODEL.params, MODEL.config, seqs, jnp.broadcast_to(jnp.arange(t), (b, t)),
                   KVCache.zeros(MODEL.config, b, t), jnp.zeros(b, jnp.int32), causal_mask(b, t)).logits


def exact_tables(settings: dict) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """P(t1), P(t2 | t1), P(t3 | t1, t2) of the filtered target, by running every continuation."""
    logits = _all_continuation_logits()
    probs = jax.jit(target_probs)(logits, SamplingParams.make(logits.shape[0], **settings))
    probs = np.asarray(probs, np.float64).reshape(V, V, -1, V)
    return probs[0, 0, len(PROMPT) - 1], probs[:, 0, len(PROMPT)], probs[:, :, len(PROMPT) + 1]


def exact_pairs(tables) -> np.ndarray:
    """P(t2, t3) = sum_t1 P(t1) P(t2 | t1) P(t3 | t1, t2)."""
    p1, p2, p3 = tables
    return np.einsum("a,ab,abc->bc", p1, p2, p3)


class Context:
    """The target's next-token distribution after a generated history (from the exact tables)."""

    def __init__(self, tables):
        _, self.p2, self.p3 = tables

    def next(self, history: list[int]) -> np.ndarray:
        if len(history) == 1:
            return self.p2[history[0]]
        if len(history) == 2:
            return self.p3[history[0], history[1]]
        return np.full(V, 1.0 / V)  # past t3: nothing is observed there


def ranked(p: np.ndarray) -> np.ndarray:
    """Tokens from most to least likely."""
    return np.argsort(-p, kind="stable")


# Tree builders: (context, history, rng) -> (tokens, parents, q_dists or None) of one row's tree.
# build_tree pads every tree to CAPACITY with invalid slots, so one step program serves them all.
CAPACITY = 9


def fixed_siblings(ctx, history, rng):
    """The same tokens for every row: three root children, one child each."""
    return [0, 1, 2, 3, 4, 5], [-1, -1, -1, 0, 1, 2], None


def likely_siblings(ctx, history, rng):
    """Root children: the target's top 3 (most likely first); under each, its top 1."""
    top = ranked(ctx.next(history))[:3]
    kids = [ranked(ctx.next(history + [int(c)]))[0] for c in top]
    return list(top) + kids, [-1, -1, -1, 0, 1, 2], None


def likely_chain(ctx, history, rng):
    """A greedy chain of 3 along the target's most likely tokens."""
    tokens, h = [], list(history)
    for _ in range(3):
        tokens.append(int(ranked(ctx.next(h))[0]))
        h.append(tokens[-1])
    return tokens, [-1, 0, 1], None


def likely_wide_tree(ctx, history, rng):
    """8 nodes: the 2nd-likely root child first, then the 1st and a random one; the 2nd's top two
    children, a chain of two under the 1st, a random child under the random one."""
    top = ranked(ctx.next(history))
    second, first = int(top[1]), int(top[0])
    under_second = ranked(ctx.next(history + [second]))
    under_first = int(ranked(ctx.next(history + [first]))[0])
    deeper = int(ranked(ctx.next(history + [first, under_first]))[0])
    tokens = [second, first, int(rng.integers(V)), int(under_second[0]), int(under_second[1]), under_first,
              deeper, int(rng.integers(V))]
    return tokens, [-1, -1, -1, 0, 0, 1, 5, 2], None


def sharpened(p: np.ndarray) -> np.ndarray:
    """A drafter close to the target but overconfident: p^2 plus a floor, normalized."""
    q = p ** 2 + 0.02
    return q / q.sum()


def likely_q_siblings(ctx, history, rng):
    """Model-drafter style: 3 root children i.i.d. from q = sharpened target, one q-child each."""
    q_root = sharpened(ctx.next(history))
    top = [int(c) for c in rng.choice(V, size=3, p=q_root)]
    q_kids = [sharpened(ctx.next(history + [c])) for c in top]
    kids = [int(rng.choice(V, p=q)) for q in q_kids]
    q_leaves = [np.full(V, 1.0 / V)] * 3
    return top + kids, [-1, -1, -1, 0, 1, 2], np.stack([q_root] + q_kids + q_leaves)


def uniform_claimed_q(ctx, history, rng):
    """Control: drafts from the sharpened q, but acceptance is told q is uniform."""
    tokens, parents, q_dists = likely_q_siblings(ctx, history, rng)
    return tokens, parents, np.full_like(q_dists, 1.0 / V)


def build_tree(builder, ctx, histories, rng) -> DraftTree:
    rows = [builder(ctx, h, rng) for h in histories]
    tokens = np.zeros((len(rows), CAPACITY), np.int32)
    parents = np.full((len(rows), CAPACITY), -1, np.int32)
    valid = np.zeros((len(rows), CAPACITY), bool)
    q_dists = np.full((len(rows), CAPACITY + 1, V), 1.0 / V, np.float32)
    for i, (row_tokens, row_parents, row_q) in enumerate(rows):
        n = len(row_tokens)
        tokens[i, :n], parents[i, :n], valid[i, :n] = row_tokens, row_parents, True
        if row_q is not None:
            q_dists[i, : len(row_q)] = row_q
    with_q = rows[0][2] is not None
    return DraftTree(jnp.asarray(tokens), jnp.asarray(parents), jnp.asarray(valid),
                     q_dists=jnp.asarray(q_dists) if with_q else None)


def sample_pairs(settings: dict, builder, seed: int, tables=None) -> np.ndarray:
    """Prefill + fused speculative steps (verify + accept) for N copies of the prompt; (t2, t3) per copy.

    ``settings`` may hold per-row sequences (one value per copy)."""
    cfg = MODEL.config
    ctx = Context(tables if tables is not None else exact_tables(settings))
    tokens = jnp.asarray([PROMPT + [0] * (PROMPT_WIDTH - len(PROMPT))] * N, jnp.int32)
    prefilled = prefill(MODEL.params, cfg, tokens, jnp.full(N, len(PROMPT), jnp.int32),
                        jnp.full(N, 3, jnp.int32), jax.random.key(seed), SamplingParams.make(N, **settings),
                        max_len=MAX_LEN, attention="xla")
    state, first = prefilled.state, prefilled.first_tokens
    outputs = [[int(t)] for t in np.asarray(first)]
    rng = np.random.default_rng(seed)
    while min(len(o) for o in outputs) < 3:
        tree = build_tree(builder, ctx, outputs, rng)
        state, acc = step(MODEL.params, state, tree, cfg=cfg, attention="xla", eos_ids=())
        emitted, num = jax.device_get((acc.tokens, acc.num))
        for i in range(N):
            outputs[i].extend(emitted[i, : num[i]].tolist())
    return np.array([o[1:3] for o in outputs])


def chi_square_p(pairs: np.ndarray, expected: np.ndarray) -> float:
    observed = np.zeros((V, V))
    np.add.at(observed, (pairs[:, 0], pairs[:, 1]), 1)
    exp = expected.ravel() * len(pairs)
    obs = observed.ravel()
    if obs[exp == 0].sum() > 0:
        return 0.0  # a pair the target can never produce was sampled
    keep = exp >= 5  # merge sparse cells into one bucket
    obs = np.append(obs[keep], obs[~keep].sum())
    exp = np.append(exp[keep], exp[~keep].sum())
    if exp[-1] == 0:
        obs, exp = obs[:-1], exp[:-1]
    return stats.chisquare(obs, exp * obs.sum() / exp.sum()).pvalue


def p_value(settings: dict, builder, seed: int) -> float:
    tables = exact_tables(settings)
    return chi_square_p(sample_pairs(settings, builder, seed, tables), exact_pairs(tables))


CASES = [
    (T1, fixed_siblings), (T1, likely_siblings), (T1, likely_chain), (T1, likely_wide_tree),
    (T1, likely_q_siblings), (FILTERED, likely_siblings), (FILTERED, likely_wide_tree),
    (FILTERED, likely_q_siblings),
]


@pytest.mark.parametrize("settings, builder", CASES,
                         ids=[f"{'t1' if s is T1 else 'topk_topp'}-{b.__name__}" for s, b in CASES])
def test_speculative_samples_keep_the_distribution(settings, builder):
    assert p_value(settings, builder, seed=0) > REAL_CODE_P


class LikelyTokensDrafter:
    """A host drafter proposing ``likely_siblings`` trees from the exact tables."""

    def __init__(self, tables):
        self.ctx, self.rng, self.histories = Context(tables), np.random.default_rng(0), {}

    def start_request(self, rid, prompt_ids):
        self.histories[rid] = []

    def observe(self, rid, accepted_ids):
        self.histories[rid].extend(int(t) for t in accepted_ids)

    def stop_request(self, rid):
        del self.histories[rid]

    def propose(self, rid, max_tokens):
        tokens, parents, _ = likely_siblings(self.ctx, self.histories[rid], self.rng)
        n = min(len(tokens), max_tokens)
        return Proposal(np.array(tokens[:n], np.int32), np.array(parents[:n], np.int32), np.ones(n, np.float32))


def test_engine_generate_with_per_prompt_settings():
    """Engine.generate end to end: per-prompt temperature / top-k / top-p in one batch; greedy
    prompts give the greedy continuation, each sampled group keeps its own distribution."""
    groups = [dict(temperature=0.0), T1, FILTERED]
    group = np.arange(N) % len(groups)
    settings = {key: [groups[g].get(key, default) for g in group]
                for key, default in (("temperature", 0.0), ("top_k", 0), ("top_p", 1.0))}
    engine = Engine(MODEL, LikelyTokensDrafter(exact_tables(T1)), draft_capacity=CAPACITY, attention="xla",
                    max_batch_size=N)
    results = engine.generate([PROMPT] * N, max_new_tokens=3, seed=5, **settings)
    pairs = np.array([r.token_ids[1:3] for r in results])
    assert sum(r.accepted_draft_tokens for r in results) > N / 2  # the drafts were used
    greedy = exact_pairs(exact_tables(groups[0]))
    assert np.all(pairs[group == 0] == np.argwhere(greedy == 1)[0])
    for g in (1, 2):
        assert chi_square_p(pairs[group == g], exact_pairs(exact_tables(groups[g]))) > REAL_CODE_P


def test_a_drafter_lying_about_q_cannot_bias_the_output():
    """Acceptance compares each node with the target's own draw at its position, never with q:
    a q that misstates how the children were drawn changes nothing."""
    assert p_value(T1, uniform_claimed_q, seed=2) > REAL_CODE_P


# ---------------------------------------------------------------- negative controls
#
# Copies of steps._sampled_walk, each with one rule broken:
#   same_noise: every position draws with the same noise (the position is not folded in);
#   depth_not_position: the noise is the depth within the step's tree, not the position in the
#     sequence (so consecutive steps reuse it);
#   bonus_next_noise: the bonus token is drawn with the next position's noise, which the next
#     step's draw at that position reuses.

def wrong_walk(variant: str):
    def sampled_walk(tokens, parents, valid, logits, lengths, keys, sampling, done):
        b, n = tokens.shape
        rows = jnp.arange(b)
        child_slot = jnp.arange(n)[None, :] >= 1

        def position(d):
            if variant == "same_noise":
                return jnp.zeros_like(lengths)
            if variant == "depth_not_position":
                return jnp.zeros_like(lengths) + d
            return lengths + d + 1

        def body(carry):
            d, alive, best, bonus, done = carry
            node = jnp.argmax(alive, axis=1)
            logp = jnp.log(target_probs(logits[rows, node], sampling))
            draw = gumbel_argmax(position_keys(keys, position(d)), logp)
            children = child_slot & valid & jnp.take_along_axis(alive, parents, axis=1) & (tokens == draw[:, None])
            found = jnp.any(children, axis=1) & ~done
            best = jnp.where(found, jnp.argmax(children, axis=1), best)
            bonus_draw = draw
            if variant == "bonus_next_noise":
                bonus_draw = gumbel_argmax(position_keys(keys, position(d) + 1), logp)
            bonus = jnp.where(done | found, bonus, bonus_draw)
            return d + 1, jnp.where(found[:, None], children, alive), best, bonus, done | ~found

        alive = jnp.zeros((b, n), bool).at[:, 0].set(True)
        init = (jnp.int32(0), alive, jnp.zeros(b, jnp.int32), jnp.zeros(b, jnp.int32), done)
        _, _, best, bonus, _ = lax.while_loop(lambda c: ~jnp.all(c[-1]), body, init)
        return best.astype(jnp.int32), bonus

    return sampled_walk


@pytest.fixture
def patched_walk(monkeypatch):
    """Swap the engine's tree walk for a wrong copy. Only the jitted ``step`` is evicted
    (retraced around the copy, and again around the real one afterwards): prefill stays
    compiled. A copy that failed to take effect would pass the chi-square: loud, not silent."""
    def install(variant):
        monkeypatch.setattr(steps, "_sampled_walk", wrong_walk(variant))
        step.clear_cache()

    yield install
    monkeypatch.undo()
    step.clear_cache()


@pytest.mark.parametrize("variant, builder", [("same_noise", likely_siblings),
                                              ("depth_not_position", fixed_siblings),
                                              ("bonus_next_noise", fixed_siblings)])
def test_wrong_tree_walks_are_detected(patched_walk, variant, builder):
    patched_walk(variant)
    assert p_value(T1, builder, seed=0) < CONTROL_P


def test_the_control_copy_is_faithful():
    """With no rule broken the copy draws exactly what the engine's walk draws, so each control
    differs from the real code by its one rule. Update the copy when steps._sampled_walk changes."""
    rng = np.random.default_rng(0)
    rows, n = 64, 7
    parents = np.broadcast_to([0, 0, 0, 0, 1, 1, 4], (rows, n))
    args = (jnp.asarray(rng.integers(0, V, (rows, n)), jnp.int32), jnp.asarray(parents, jnp.int32),
            jnp.asarray(rng.random((rows, n)) < 0.9), jnp.asarray(rng.normal(0, 1.5, (rows, n, V)), jnp.float32),
            jnp.asarray(rng.integers(3, 40, rows), jnp.int32), jax.random.split(jax.random.key(0), rows),
            SamplingParams.make(rows, 1.0), jnp.zeros(rows, bool))
    real, copy = (jax.jit(walk)(*args) for walk in (steps._sampled_walk, wrong_walk("none")))
    np.testing.assert_array_equal(real[0], copy[0])
    np.testing.assert_array_equal(real[1], copy[1])
    assert len(np.unique(np.asarray(real[0]))) > 1  # paths of different lengths were accepted
