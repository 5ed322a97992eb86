"""Hybrid drafters: Graft (pruned model tree + grafted retrieval) and TAPS (routing / merged trees).

Greedy output equals plain greedy for Graft and every TAPS mode; retrieved
nodes are grafted into the verified trees and accepted on a repeating
workload; merged trees are trees (no duplicate siblings, at most T nodes).
Under sampling, Graft and merged / routed TAPS keep the target's distribution
(chi-square against exact enumeration on a 6-token vocab); a Graft that
forwards its model tree's q to the hybrid tree (whose children are not draws
from that q) is the negative control the same test must reject.
"""


import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import stats

from engine_helpers import chi_square_p, exact_pair_distribution, exact_tables, near_copy, tiny_model
from specjax.drafters.draft_model import DraftModelDrafter
from specjax.drafters.eagle3 import Eagle3Config, Eagle3Drafter
from specjax.drafters.eagle3 import init_params as eagle3_init
from specjax.drafters.graft import GRAFTED, KEPT, GraftDrafter
from specjax.drafters.hybrid import concat_parts, merge_trees
from specjax.drafters.prompt_lookup import PromptLookupDrafter
from specjax.drafters.routing import TapsDrafter, root_distribution_signals, weight_average
from specjax.drafters.suffix_index import SuffixDecodingDrafter
from specjax.drafters.token_recycling import TokenRecyclingDrafter
from specjax.engine.device_loop import generate_on_device
from specjax.engine.engine import Engine
from specjax.engine.plain import greedy_generate
from specjax.engine.sampling import SamplingParams
from specjax.engine.tree import DraftTree, validate_tree
from specjax.models.config import ModelConfig
from specjax.models.loading import Model

VOCAB = 64
TARGET = tiny_model(2, vocab=VOCAB, layers=1)
PROMPTS = [[5, 17, 33, 8], [9, 42, 61, 7, 7, 3, 30, 11], [3], [50, 51, 52]]
NEW_TOKENS = 20


def draft(model: Model, capacity: int = 6, topk: int = 2, depth: int = 3) -> DraftModelDrafter:
    return DraftModelDrafter(model, model.config.vocab_size, capacity=capacity, topk=topk, depth=depth)


def random_eagle3(target: Model, capacity: int = 6) -> Eagle3Drafter:
    """An untrained EAGLE-3 head (draft vocab 50 of 64) fed the target's embeddings and layer output."""
    t = target.config
    layer = ModelConfig(model_type="llama", vocab_size=t.vocab_size, hidden_size=t.hidden_size, intermediate_size=64,
                        num_layers=1, num_heads=4, num_kv_heads=2, head_dim=t.hidden_size // 4, rms_norm_eps=1e-5)
    cfg = Eagle3Config(layer, 50, t.hidden_size)
    return Eagle3Drafter(cfg, eagle3_init(cfg, jax.random.key(0)), t.num_layers, capacity=capacity, topk=2, depth=3,
                         hidden_layers=(0, 1, 1))


@pytest.fixture(scope="module")
def expected():
    return greedy_generate(TARGET, PROMPTS, NEW_TOKENS)


def no_duplicate_siblings(tree: DraftTree) -> bool:
    tokens, parents, valid = (np.asarray(x) for x in (tree.tokens, tree.parents, tree.valid))
    for b in range(tokens.shape[0]):
        pairs = [(int(p), int(t)) for p, t, v in zip(parents[b], tokens[b], valid[b]) if v]
        if len(pairs) != len(set(pairs)):
            return False
    return True


def paths(tree: DraftTree, row: int) -> set:
    """Every node's path (a token tuple) in one row of a tree."""
    tokens, parents, valid = (np.asarray(x)[row] for x in (tree.tokens, tree.parents, tree.valid))
    out = {}
    for i in range(len(tokens)):
        if valid[i]:
            out[i] = (out[parents[i]] if parents[i] >= 0 else ()) + (int(tokens[i]),)
    return set(out.values())


# ------------------------------------------------------------------ merging trees


def test_merge_trees_unions_paths_and_keeps_the_best_ancestor_closed():
    # Tree A: 7 -> 8 -> 9, 7 -> 4; tree B: 7 -> 8 -> 5, 3 (7 -> 8 duplicates A's prefix).
    a = (np.array([[7, 8, 9, 4]]), np.array([[-1, 0, 1, 0]]), np.ones((1, 4), bool), np.array([[0.9, 0.8, 0.2, 0.1]]))
    b = (np.array([[7, 8, 5, 3]]), np.array([[-1, 0, 1, -1]]), np.ones((1, 4), bool), np.array([[0.95, 0.5, 0.4, 0.3]]))
    parts = [(*a, a[3]), (*b, b[3])]
    tree, key = merge_trees(*concat_parts([tuple(map(jnp.asarray, p)) for p in parts]), 6)
    validate_tree(tree, 10)
    assert no_duplicate_siblings(tree)
    assert paths(tree, 0) == {(7,), (7, 8), (7, 8, 9), (7, 8, 5), (3,), (7, 4)}
    probs = dict(zip(map(int, np.asarray(tree.tokens)[0]), np.asarray(tree.draft_probs)[0]))
    assert probs[7] == pytest.approx(0.95)  # a merged node keeps its best copy's probability
    # Capacity 4: the 4 best of the union, ancestor-closed (9 at 0.2 loses to 3 at 0.3).
    small, _ = merge_trees(*concat_parts([tuple(map(jnp.asarray, p)) for p in parts]), 4)
    validate_tree(small, 10)
    assert paths(small, 0) == {(7,), (7, 8), (7, 8, 5), (3,)}
    # A child ranked above its parent is capped at the parent's key: never orphaned.
    low_root = (np.array([[6, 2]]), np.array([[-1, 0]]), np.ones((1, 2), bool), np.array([[0.01, 0.99]]))
    capped, _ = merge_trees(*concat_parts([tuple(map(jnp.asarray, (*low_root, low_root[3])))]), 1)
    assert paths(capped, 0) == {(6,)}


# ------------------------------------------------------------------ Graft, greedy


def test_graft_greedy_equals_plain_and_grafts_retrieved_nodes(expected):
    """An untrained EAGLE-3 head (few accepts) plus the suffix index; the second pass over the same
    prompts retrieves the first pass's outputs, so grafted nodes are verified and accepted."""
    graft = GraftDrafter(random_eagle3(TARGET), SuffixDecodingDrafter(), capacity=8)
    engine = Engine(TARGET, graft, attention="xla")
    first = engine.generate(PROMPTS, NEW_TOKENS)
    assert [r.token_ids for r in first] == expected
    first_stats = dict(graft.stats)
    second = engine.generate(PROMPTS, NEW_TOKENS)
    assert [r.token_ids for r in second] == expected
    assert graft.stats["grafted"] > 0 and graft.stats["accepted_grafted"] > NEW_TOKENS
    assert graft.stats["verified"] <= 8 * graft.stats["steps"]
    assert sum(r.target_passes for r in second) < sum(r.target_passes for r in first)
    assert graft.stats["accepted_grafted"] > first_stats["accepted_grafted"]
    graft.retrieval = PromptLookupDrafter(max_branches=2)  # host-side only: the same compiled steps
    assert [r.token_ids for r in engine.generate(PROMPTS, NEW_TOKENS)] == expected


def test_graft_tree_priorities():
    """Kept model nodes first, then retrieved ones, then refilled model nodes; a retrieved path
    running along a kept model node continues below it."""
    graft = GraftDrafter(draft(TARGET), PromptLookupDrafter(), capacity=5, model_budget=2)
    model = DraftTree(tokens=jnp.array([[7, 4, 8, 9]]), parents=jnp.array([[-1, -1, 0, 2]]),
                      valid=jnp.ones((1, 4), bool), draft_probs=jnp.array([[0.6, 0.3, 0.5, 0.2]]))
    retrieved = (jnp.array([[7, 8, 1, 2]]), jnp.array([[-1, 0, 1, 2]]), jnp.ones((1, 4), bool),
                 jnp.array([[1.0, 1.0, 1.0, 1.0]]))
    tree, origin = graft.graft_tree(model, retrieved)
    validate_tree(tree, VOCAB)
    assert paths(tree, 0) == {(7,), (7, 8), (7, 8, 1), (7, 8, 1, 2), (4,)}
    by_path = {}
    tokens, parents, org = np.asarray(tree.tokens)[0], np.asarray(tree.parents)[0], np.asarray(origin)[0]
    for i in range(5):
        by_path[i] = (by_path[parents[i]] if parents[i] >= 0 else ()) + (int(tokens[i]),)
    kinds = {by_path[i]: org[i] for i in range(5)}
    assert kinds[(7,)] == KEPT and kinds[(7, 8)] == KEPT and kinds[(7, 8, 1)] == GRAFTED
    assert kinds[(4,)] == 0.0  # refilled: the pruned model node fills the last slot


# ------------------------------------------------------------------ TAPS, greedy


def taps(routing: str) -> TapsDrafter:
    """The target as its own draft (always right) and a random draft model (rarely right); for entropy
    routing an untrained EAGLE-3 head instead (drafters with different target features)."""
    other = random_eagle3(TARGET) if routing == "entropy" else draft(tiny_model(7, vocab=VOCAB, layers=1))
    return TapsDrafter([draft(TARGET), other], VOCAB, routing=routing)


def test_routing_signals_rank_a_peaked_draft_above_a_flat_one():
    one = lambda probs: DraftTree(jnp.array([[1, 2, 3]]), jnp.array([[-1, -1, 0]]), jnp.ones((1, 3), bool),
                                  jnp.array([probs]))
    peaked, flat = one([0.9, 0.05, 0.5]), one([0.03, 0.02, 0.01])
    (c_peaked, h_peaked), (c_flat, h_flat) = (root_distribution_signals(t, VOCAB) for t in (peaked, flat))
    assert c_peaked > c_flat and h_peaked < h_flat  # counting the flat draft's tail as one outcome would fail
    q = np.random.default_rng(0).dirichlet(np.ones(VOCAB), 1).astype(np.float32)
    with_q = DraftTree(peaked.tokens, peaked.parents, peaked.valid, peaked.draft_probs,
                       jnp.asarray(np.repeat(q[:, None], 4, axis=1)))
    top1, entropy = root_distribution_signals(with_q, VOCAB)
    assert float(top1[0]) == pytest.approx(q.max()) and float(entropy[0]) == pytest.approx(stats.entropy(q[0]), 1e-5)


@pytest.mark.parametrize("routing", ["entropy", "merged"])  # confidence: greedy rows of the sampling test
def test_taps_greedy_equals_plain(routing, expected):
    drafter = taps(routing)
    results = generate_on_device(Engine(TARGET, attention="xla"), PROMPTS, NEW_TOKENS, drafter=drafter,
                                 steps_per_sync=4)
    assert [r.token_ids for r in results] == expected
    tokens = sum(len(r.token_ids) for r in results)
    assert tokens / sum(r.target_passes for r in results) > 1.5  # the self-draft's proposals are used
    if routing == "entropy":  # the self-draft is sure, the untrained head is not
        picks = drafter.last_picks.sum(axis=0)
        assert picks[0] > picks[1]


def test_merged_trees_are_trees_within_capacity():
    drafter = taps("merged")
    rows = len(PROMPTS)
    tokens = np.zeros((rows, 16), np.int32)
    lengths = np.array([len(p) for p in PROMPTS], np.int32)
    for i, p in enumerate(PROMPTS):
        tokens[i, : len(p)] = p
    roots = jnp.asarray([1, 2, 3, 4])

    @jax.jit
    def trees(tokens, lengths):
        state = drafter.prefill(drafter.params, drafter.init_state(rows, 64), tokens, lengths, roots, None)
        own = [d.propose(p, s, roots, lengths, SamplingParams.make(rows), jax.random.key(0))[0]
               for d, p, s in zip(drafter.drafters, drafter.params, state.states)]
        return drafter.merged_tree(own), own

    tree, own = trees(jnp.asarray(tokens), jnp.asarray(lengths))
    validate_tree(tree, VOCAB)
    assert tree.capacity == drafter.capacity and tree.q_dists is None
    assert no_duplicate_siblings(tree)
    assert np.asarray(tree.valid).sum(axis=1).min() == drafter.capacity  # the union fills T
    # "even" split: each drafter's T // 2 most probable nodes are in the merged tree.
    for t in own:
        probs = np.asarray(t.draft_probs)
        for b in range(rows):
            best = np.argsort(-probs[b], kind="stable")[: drafter.capacity // 2]
            node_paths = _node_paths(t, b)
            assert {node_paths[i] for i in best} <= paths(tree, b)


def _node_paths(tree: DraftTree, row: int) -> list:
    tokens, parents = np.asarray(tree.tokens)[row], np.asarray(tree.parents)[row]
    out = []
    for i in range(len(tokens)):
        out.append((out[parents[i]] if parents[i] >= 0 else ()) + (int(tokens[i]),))
    return out


def test_weight_average_and_bad_members():
    a, b = tiny_model(1, vocab=VOCAB, layers=1).params, tiny_model(2, vocab=VOCAB, layers=1).params
    avg = weight_average([a, b])
    np.testing.assert_allclose(avg["embed"], (a["embed"] + b["embed"]) / 2, rtol=1e-6)
    with pytest.raises(ValueError, match="one architecture"):
        weight_average([a, {"embed": a["embed"]}])
    with pytest.raises(ValueError, match="differs"):
        weight_average([{"d2t": np.arange(3)}, {"d2t": np.arange(3) + 1}])
    with pytest.raises(ValueError, match="Token Recycling"):
        TapsDrafter([draft(TARGET), TokenRecyclingDrafter(VOCAB, capacity=6)], VOCAB)
    with pytest.raises(ValueError, match="routing must be"):
        TapsDrafter([draft(TARGET), draft(TARGET)], VOCAB, routing="vote")
    with pytest.raises(ValueError, match="model_budget"):
        GraftDrafter(draft(TARGET), PromptLookupDrafter(), capacity=4, model_budget=5)


# ------------------------------------------------------------------ sampling keeps the distribution

V = 6
SMALL = tiny_model(3, vocab=V)
PROMPT = [1, 2, 3, 1, 2, 3, 1, 2]  # repetitive, so prompt lookup drafts
N = 3000


def sampled_pairs(drafter, temperature: float, seed: int, greedy_rows: int = 0) -> np.ndarray:
    """(t2, t3) of N sampled rows; ``greedy_rows`` more rows (temperature 0, same batch) must give
    the target's greedy continuation."""
    # A fixed tree size: the auto size would mostly take plain steps on a CPU, and the drafts must matter.
    engine = Engine(SMALL, drafter, attention="xla", max_batch_size=N + greedy_rows, draft_capacity=drafter.capacity)
    results = engine.generate([PROMPT] * (N + greedy_rows), 3, seed=seed,
                              temperature=[temperature] * N + [0.0] * greedy_rows)
    assert sum(r.accepted_draft_tokens for r in results) > N // 4  # the drafts matter
    assert all(r.token_ids == greedy_continuation() for r in results[N:])
    return np.array([r.token_ids[1:3] for r in results[:N]])


def greedy_continuation() -> list:
    """t1, t2, t3 of greedy decoding after PROMPT (the argmax of the exact tables)."""
    p1, p2, p3 = exact_tables(SMALL, PROMPT, 1.0)
    t1 = int(np.argmax(p1))
    t2 = int(np.argmax(p2[t1]))
    return [t1, t2, int(np.argmax(p3[t1, t2]))]


def near_draft(seed: int, capacity: int = 4) -> DraftModelDrafter:
    return draft(near_copy(SMALL, 0.25, seed=seed), capacity=capacity, topk=2, depth=2)


class AlwaysQ:
    """Control: the model drafts as for a q-carrying tree (sampled children, q_dists) whatever it is asked."""

    def __init__(self, inner: DraftModelDrafter):
        self.inner, self.capacity, self.hidden_layers, self.shape = inner, inner.capacity, (), inner.shape
        self.params = inner.params

    def __getattr__(self, name):
        return getattr(self.inner, name)

    def propose(self, params, dstate, root_tokens, lengths, sampling, key, *, with_q=False):
        return self.inner.propose(params, dstate, root_tokens, lengths, sampling, key, with_q=True)


class ForwardsModelQ(GraftDrafter):
    """Control: the hybrid tree carries the model tree's q_dists, though its children are top
    model nodes and grafted tokens, not draws from that q."""

    def graft_tree(self, model_tree, retrieved):
        tree, origin = super().graft_tree(model_tree, retrieved)
        return DraftTree(tree.tokens, tree.parents, tree.valid, tree.draft_probs, model_tree.q_dists), origin


def test_graft_sampling_keeps_the_distribution():
    graft = GraftDrafter(near_draft(9), PromptLookupDrafter(max_branches=2), capacity=4)
    pairs = sampled_pairs(graft, 0.8, seed=1, greedy_rows=8)
    assert graft.stats["grafted"] > N // 4 and graft.stats["accepted_grafted"] > 0
    assert chi_square_p(pairs, exact_pair_distribution(SMALL, PROMPT, 0.8)) > 1e-4


def test_graft_forwarding_model_q_cannot_bias_the_output():
    """Acceptance compares each node with the target's own draw at its position, never with q
    (see "Seeds" in the README): a tree carrying a q its children were not drawn from is harmless."""
    control = ForwardsModelQ(AlwaysQ(near_draft(9)), PromptLookupDrafter(max_branches=2), capacity=4)
    pairs = sampled_pairs(control, 0.8, seed=2)
    assert chi_square_p(pairs, exact_pair_distribution(SMALL, PROMPT, 0.8)) > 1e-4


@pytest.mark.parametrize("routing", ["merged", "confidence", "entropy"])
def test_taps_sampling_keeps_the_distribution(routing):
    """Sampled rows keep the distribution; greedy rows in the same batch stay greedy."""
    drafter = TapsDrafter([near_draft(9), near_draft(10)], V, routing=routing)
    pairs = sampled_pairs(drafter, 0.8, seed=3, greedy_rows=8)
    assert chi_square_p(pairs, exact_pair_distribution(SMALL, PROMPT, 0.8)) > 1e-4


# ------------------------------------------------------------------ CLI


def test_cli_builds_hybrid_drafters():
    from specjax.drafters.factory import load_drafter
    from specjax.models.embedded import default_model_dir
    from specjax.models.loading import load_model

    directory = default_model_dir()  # the embedded model as its own draft model
    target = load_model(directory, dtype=jnp.float32)
    options = dict(draft_capacity=8, max_draft_capacity=16, routing="merged", retrieval="prompt-lookup")
    graft = load_drafter("graft", target, drafter_model=directory, **options)
    assert isinstance(graft, GraftDrafter) and graft.capacity == 8
    assert isinstance(graft.retrieval, PromptLookupDrafter) and isinstance(graft.model, DraftModelDrafter)
    router = load_drafter("taps", target, drafter_model=f"{directory},{directory}", **options)
    assert isinstance(router, TapsDrafter) and router.routing == "merged" and len(router.drafters) == 2
    with pytest.raises(ValueError, match="one --drafter-model"):
        load_drafter("graft", target, drafter_model=f"{directory},{directory}", **options)
    with pytest.raises(ValueError, match="at least two drafters"):
        load_drafter("taps", target, drafter_model=directory, **options)


def test_graft_stops_and_reports_progress_like_the_host_engine():
    """Graft's own loop goes through the engine's public stop and progress surface: ids through the
    token completing a stop string and text cut before it, as the host engine gives them."""
    from specjax.drafters.factory import load_drafter
    from specjax.models.embedded import default_model_dir
    from specjax.models.loading import load_model
    from specjax.models.embedded.toy_corpus import sql_prompts

    class Bar:
        def __init__(self):
            self.updates = []

        def update(self, n):
            self.updates.append(n)

    target = load_model(default_model_dir(), dtype=jnp.float32)
    prompts, stop = sql_prompts(3, seed=2), [" WHERE", " FROM"]
    plain = Engine(target, None, draft_capacity=0, attention="xla").generate(prompts, 40, stop=stop)
    graft = load_drafter("graft", target, drafter_model=default_model_dir(), draft_capacity=6,
                         retrieval="prompt-lookup")
    bar = Bar()
    results = Engine(target, graft, attention="xla").generate(prompts, 40, stop=stop, progress=bar)
    assert [r.token_ids for r in results] == [r.token_ids for r in plain]
    assert [r.text for r in results] == [r.text for r in plain]
    assert all(" FROM" not in r.text for r in results)
    assert all(any(s in target.tokenizer.decode(r.token_ids) for s in stop) for r in results)  # every row stopped
    assert bar.updates and all(n > 0 for n in bar.updates)
