"""The auto tree size in the on-device loop: per chunk, a compiled bucket (0 = plain steps)
chosen from measured step costs and calibrated drafter claims. Lossless whatever it picks,
no recompiles of a bucket that has run, and a drafter that never pays speculates rarely."""


import dataclasses

import jax.numpy as jnp
import numpy as np
import pytest

from engine_helpers import WrongDrafter, grow_chunk_policies_to_every_size, tiny_model
from specjax.drafters.draft_model import DraftModelDrafter
from specjax.drafters.token_recycling import TokenRecyclingDrafter
from specjax.engine import device_loop
from specjax.engine.autotune import ChunkPolicy
from specjax.engine.device_loop import keep_best
from specjax.engine.engine import Engine
from specjax.engine.plain import greedy_generate
from specjax.engine.tree import DraftTree

V = 64
TARGET = tiny_model(2, vocab=V)
PROMPTS = [[5, 17, 33, 8], [9, 42, 61, 7, 7, 3, 30, 11], [3], [50, 51, 52, 53, 54, 55]]
NEW_TOKENS = 40


EXPECTED = greedy_generate(TARGET, PROMPTS, 64)
NEVER = min(set(range(V)) - {t for out in EXPECTED for t in out})  # a token plain decoding never emits


WRONG = WrongDrafter(NEVER)  # one instance: its compiled programs serve both tests below


def speculative_share(history) -> float:
    return sum(t > 0 for t, _ in history) / len(history)


def test_a_drafter_that_is_always_wrong_stays_lossless_and_rarely_speculates():
    expected = EXPECTED
    engine = Engine(TARGET, WRONG, max_draft_capacity=2, attention="xla")
    first = engine.generate(PROMPTS, 64)  # measures plain steps and the smallest tree on the live batch
    (policy,) = engine._chunk_policies.values()
    assert {0, 1} <= set(policy.costs)
    measured = len(policy.history)
    second = engine.generate(PROMPTS, 64)
    assert [r.token_ids for r in first] == [r.token_ids for r in second] == expected
    assert speculative_share(policy.history[measured:]) < 0.35
    assert policy.calibration < 0.1  # a chunk of 8 steps accepting nothing leaves 0.7 ** 8 of the claims


def test_switching_buckets_compiles_nothing_new():
    engine = Engine(TARGET, WRONG, max_draft_capacity=2, attention="xla")
    engine.generate(PROMPTS, 48)
    (policy,) = engine._chunk_policies.values()
    compiled = device_loop.run_steps._cache_size()
    measured = len(policy.history)
    ran = {t for t, _ in policy.history}
    policy.calibration, policy._plain_left = 50.0, 0  # claims now look great: it will switch to trees
    results = engine.generate(PROMPTS[::-1], 48)  # the reversed batch: prefixes of EXPECTED
    used = {t for t, _ in policy.history[measured:]}
    assert len(used) >= 2 and max(used) > 0  # it did switch between programs ...
    # ... compiling only buckets that had never run (lazily, on first use)
    assert device_loop.run_steps._cache_size() - compiled <= len(used - ran)
    assert [r.token_ids for r in results] == greedy_generate(TARGET, PROMPTS[::-1], 48)


def test_a_draft_model_is_created_and_reads_the_prompt_only_when_a_batch_speculates(monkeypatch):
    """Plain chunks leave a catch-up drafter alone, so under the auto size its state is parked
    (``LoopState.dstate`` None: plain chunks run plain decoding's program), and it is created and
    prefilled only for the batch's first speculative chunk: a batch that runs plain throughout pays
    for neither."""
    prefills, created, chunks = [], [], []  # chunks: (T, whether the drafter's state was in the loop)
    real_prefill, real_run = device_loop._drafter_prefill, device_loop.run_steps
    monkeypatch.setattr(device_loop, "_drafter_prefill", lambda *a, **k: prefills.append(1) or real_prefill(*a, **k))
    real_init = DraftModelDrafter.init_state
    monkeypatch.setattr(DraftModelDrafter, "init_state", lambda self, *a: created.append(a[0]) or real_init(self, *a))

    def run_steps(params, dparams, loop, steps, **kwargs):
        chunks.append((kwargs.get("capacity"), loop.dstate is not None))
        return real_run(params, dparams, loop, steps, **kwargs)

    monkeypatch.setattr(device_loop, "run_steps", run_steps)
    engine = Engine(TARGET, DraftModelDrafter(TARGET, V, capacity=2), max_draft_capacity=2, attention="xla")
    engine.generate(PROMPTS, 40)  # measures plain steps and T=1 (two chunks each): one prefill, before T=1's
    assert len(prefills) == 1 and created == [4]
    assert {t for t, _ in chunks} == {0, 1} and all(held == (t > 0) for t, held in chunks)
    (policy,) = engine._chunk_policies.values()
    policy._plain_left = 10 ** 6  # plain chunks only from now on
    chunks.clear()
    results = engine.generate(PROMPTS, 24)
    assert len(prefills) == 1 and created == [4] and all(t == 0 for t, _ in policy.history[-3:])
    assert chunks and not any(held for _, held in chunks)
    assert [r.token_ids for r in results] == greedy_generate(TARGET, PROMPTS, 24)
    # Control: the fixed tree size speculates from the first step, so it reads the prompt at once.
    fixed = Engine(TARGET, DraftModelDrafter(TARGET, V, capacity=2), draft_capacity=2, attention="xla")
    chunks.clear()
    fixed.generate(PROMPTS, 8)
    assert len(prefills) == 2 and created == [4, 4] and all(held for _, held in chunks)


@pytest.mark.parametrize("event, counted", [("/jax/core/compile/backend_compile_duration", False),
                                              ("/jax/some/other_duration", True)])
def test_compiling_the_draft_models_prefill_is_not_its_setup_cost(monkeypatch, event, counted):
    """A new prompt shape compiles the lazy prefill on its first call: a one-off, not what each batch's
    first tree must pay. Here the prefill sleeps 0.2 s reported as a compile span (as JAX reports
    compiling) and the policy's prefill cost stays near zero; the control reports it as another
    event, and the 0.2 s counts."""
    import time

    import jax

    real_prefill = device_loop._drafter_prefill

    def reported_prefill(*args, **kwargs):
        start = time.perf_counter()
        time.sleep(0.2)
        jax.monitoring.record_event_time_span(event, start, time.perf_counter())
        return real_prefill(*args, **kwargs)

    monkeypatch.setattr(device_loop, "_drafter_prefill", reported_prefill)
    real_policy = device_loop.chunk_policy

    def trees_after_measuring(*args):
        policy = real_policy(*args)
        schedule = [0, 0, 1, 1]  # two plain chunks, then trees: the first reads the prompt
        policy.choose = lambda: schedule.pop(0) if schedule else 0
        return policy

    monkeypatch.setattr(device_loop, "chunk_policy", trees_after_measuring)
    engine = Engine(TARGET, DraftModelDrafter(TARGET, V, capacity=2), max_draft_capacity=2, attention="xla")
    engine.generate(PROMPTS, 56)
    (policy,) = engine._chunk_policies.values()
    assert (policy.setup_per_step >= 0.2 / 8) == counted
    assert counted or policy.setup_per_step < 0.1 / 8


def test_the_policy_keeps_the_draft_models_prefill_time_past_later_trees(monkeypatch):
    """The prefill a batch's first tree needed (here slowed to 0.2 s) is what spaces the probes and
    what the next batch's first tree must pay for; later trees of the batch read no prompt, so they
    must not overwrite it with nothing (a timer around every chunk's prompt check would)."""
    import time

    real_prefill = device_loop._drafter_prefill
    monkeypatch.setattr(device_loop, "_drafter_prefill", lambda *a, **k: time.sleep(0.2) or real_prefill(*a, **k))
    real_policy = device_loop.chunk_policy

    def trees_after_measuring(*args):
        policy = real_policy(*args)
        schedule = [0, 0, 1, 1, 1]  # two plain chunks, then trees: the first reads the prompt
        policy.choose = lambda: schedule.pop(0) if schedule else 0
        return policy

    monkeypatch.setattr(device_loop, "chunk_policy", trees_after_measuring)
    engine = Engine(TARGET, DraftModelDrafter(TARGET, V, capacity=2), max_draft_capacity=2, attention="xla")
    results = engine.generate(PROMPTS, 56)
    (policy,) = engine._chunk_policies.values()
    assert [t for t, _ in policy.history][:5] == [0, 0, 1, 1, 1]
    assert policy.setup_per_step >= 0.2 / 8  # the prefill over the 8 steps of its chunk
    assert [r.token_ids for r in results] == greedy_generate(TARGET, PROMPTS, 56)


RECYCLING = TokenRecyclingDrafter(V, capacity=24)  # one instance: its compiled programs serve two tests


def random_eagle3():
    """A random EAGLE-3 head over TARGET's layers 0-2 (a catch-up drafter that reads the target's features)."""
    import jax

    from specjax.drafters.eagle3 import Eagle3Config, Eagle3Drafter, init_params
    from specjax.drafters.training.export import eagle3_hf_config

    cfg = Eagle3Config.from_hf(eagle3_hf_config(TARGET.config, (0, 1, 2)))
    params = init_params(cfg, jax.random.key(3), jnp.float32, scale=0.3)
    params["embed"], params["d2t"] = TARGET.params["embed"], jnp.zeros(cfg.draft_vocab_size, jnp.int32)
    return Eagle3Drafter(cfg, params, TARGET.config.num_layers, capacity=8, topk=2, depth=3, hidden_layers=(0, 1, 2))


DRAFTERS = {
    "token_recycling": lambda: RECYCLING,
    "draft_chain_self": lambda: DraftModelDrafter(TARGET, V, capacity=8),
    "draft_tree": lambda: DraftModelDrafter(tiny_model(4, vocab=V), V, capacity=8, topk=2, depth=3),
    "eagle3": random_eagle3,
}


@pytest.mark.parametrize("name", sorted(DRAFTERS))
def test_auto_size_is_lossless_across_switches(name, monkeypatch):
    """Every bucket runs on the live batch (0 = plain chunks included; the lazy policy made to grow
    to every size), so the drafter's state crosses each switch; the tokens equal plain greedy
    decoding."""
    grow_chunk_policies_to_every_size(monkeypatch)
    engine = Engine(TARGET, DRAFTERS[name](), max_draft_capacity=2, attention="xla")
    results = device_loop.generate_on_device(engine, PROMPTS, NEW_TOKENS, steps_per_sync=2, auto=True,
                                             max_capacity=2)
    # Rows that accept more finish first, so the batch may shrink: a policy per row count.
    assert {t for policy in engine._chunk_policies.values() for t, _ in policy.history} == {0, 1, 2}
    assert [r.token_ids for r in results] == greedy_generate(TARGET, PROMPTS, NEW_TOKENS)


def test_token_recycling_keeps_learning_through_plain_chunks():
    """A plain chunk still feeds the table: the root's successors come from the plain step's logits."""
    drafter = RECYCLING
    drafter.reset()
    engine = Engine(TARGET, drafter, max_draft_capacity=2, attention="xla")
    policy = ChunkPolicy(costs={t: 1.0 for t in (0, 1, 2)}, buckets=(0, 1, 2))
    policy.choose = lambda: 0  # plain chunks only
    engine._chunk_policies = {(drafter, 4, 128, False, 2): policy}
    results = engine.generate(PROMPTS, 24)
    assert all(t == 0 for t, _ in policy.history)
    assert [r.token_ids for r in results] == greedy_generate(TARGET, PROMPTS, 24)
    table = np.asarray(drafter.table)
    scored = {a for r in results for a in r.token_ids[:-1]}  # every emitted token but the last was a root
    assert all((table[a] >= 0).all() for a in scored)
    assert (table >= 0).all(axis=1).sum() == len(scored)


def test_keep_best_keeps_the_most_probable_nodes_with_their_parents():
    # 0 -> {1 -> 3, 2 -> 4}: best three by path probability are 0, 1, 3 (not slot order 0, 1, 2).
    tree = DraftTree(jnp.asarray([[10, 11, 12, 13, 14]]), jnp.asarray([[-1, 0, 0, 1, 2]]),
                     jnp.asarray([[True, True, True, True, True]]), jnp.asarray([[0.9, 0.6, 0.2, 0.5, 0.1]]))
    small, kept = keep_best(tree, 3)
    assert np.asarray(kept).tolist() == [[0, 1, 3]]
    assert np.asarray(small.tokens).tolist() == [[10, 11, 13]]
    assert np.asarray(small.parents).tolist() == [[-1, 0, 1]]
    # Control: the first three slots would keep node 2 (0.2) and drop node 3 (0.5).
    assert float(np.sum(np.asarray(tree.draft_probs)[0, :3])) < float(np.sum(np.asarray(small.draft_probs)))


def _paths(tree: DraftTree, row: int) -> set:
    """The row's valid nodes as token paths from the root (slot order does not matter)."""
    tokens, parents, valid = (np.asarray(x)[row] for x in (tree.tokens, tree.parents, tree.valid))
    out = set()
    for i in np.flatnonzero(valid):
        path, j = [], int(i)
        while j >= 0:
            path.append(int(tokens[j]))
            j = int(parents[j])
        out.add(tuple(path[::-1]))
    return out


def test_a_small_bucket_proposes_a_short_tree_with_the_same_best_nodes():
    """``bucket_proposer``: for bucket T the draft model builds at most 2T nodes, depth and top-k at most
    2T (T = 1: depth 2 instead of 6), and the T nodes kept are the ones the full tree's cut keeps.
    Control: a proposer one level short of T (depth T - 1) keeps other nodes."""
    import dataclasses

    import jax

    from engine_helpers import near_copy
    from specjax.drafters.device import bucket_proposer
    from specjax.engine.sampling import SamplingParams

    rows = 3
    tokens = jnp.asarray(np.random.default_rng(0).integers(0, V, (rows, 8)), jnp.int32)
    lengths = jnp.full(rows, 8, jnp.int32)
    differs = False
    for seed in range(3):
        drafter = DraftModelDrafter(near_copy(TARGET, 0.3, seed=seed), V, capacity=16, topk=4, depth=6)
        state = drafter.prefill(drafter.params, drafter.init_state(rows, 64), tokens, lengths,
                                jnp.zeros(rows, jnp.int32), None)

        def propose(d):
            return d.propose(d.params, state, jnp.zeros(rows, jnp.int32), lengths, SamplingParams.make(rows),
                             jax.random.key(0))[0]

        full = propose(drafter)
        assert bucket_proposer(drafter, 1).shape.depth == 2 and bucket_proposer(drafter, 16) is drafter
        for bucket in (1, 2, 4):
            small = bucket_proposer(drafter, bucket)
            assert small.capacity == 2 * bucket and small.shape.depth <= 2 * bucket
            want = keep_best(full, bucket)[0]
            assert all(_paths(keep_best(propose(small), bucket)[0], r) == _paths(want, r) for r in range(rows))
        short = dataclasses.replace(drafter, capacity=4, topk=4, depth=3)  # the control: too shallow for T = 4
        differs |= any(_paths(keep_best(propose(short), 4)[0], r) != _paths(keep_best(full, 4)[0], r)
                       for r in range(rows))
    assert differs


def recycling_tables(seed: int, vocab: int = V, k: int = 8) -> tuple[jnp.ndarray, jnp.ndarray]:
    """A table as ``update`` leaves it: each token's k distinct successors, most probable first."""
    rng = np.random.default_rng(seed)
    table = np.stack([rng.permutation(vocab)[:k] for _ in range(vocab)]).astype(np.int32)
    probs = -np.sort(-rng.dirichlet(np.full(vocab, 0.05), size=vocab)[:, :k], axis=1)
    return jnp.asarray(table), jnp.asarray(probs, jnp.float32)


def test_token_recycling_small_buckets_walk_only_the_template_nodes_that_can_win():
    """``bucket_proposer`` for Token Recycling: bucket T walks the template nodes with fewer than 2T
    more probable nodes ahead of them (3 of 80 for T = 1, 15 for T = 2), keeps the same T nodes as the
    whole template's cut, and claims the same for sizes up to 2T; the drafter's state keeps its own
    layout. Control: the template's first 2T nodes (breadth first) keep other nodes."""
    import jax

    from specjax.drafters.device import bucket_proposer
    from specjax.engine.device_loop import claims_by_size
    from specjax.engine.sampling import SamplingParams

    rows = 6
    roots = jnp.asarray(np.random.default_rng(1).integers(0, V, rows), jnp.int32)
    differs = False
    for seed in range(4):
        table, probs = recycling_tables(seed)
        drafter = TokenRecyclingDrafter(V, capacity=80, table=table, table_probs=probs)
        state = drafter.init_state(rows)

        def propose(d):
            return d.propose(None, state, roots, None, SamplingParams.make(rows), jax.random.key(0))

        full, _ = propose(drafter)
        for bucket, walked in ((1, 3), (2, 15), (4, None)):
            small = bucket_proposer(drafter, bucket)
            assert walked is None or small.capacity == walked
            tree, small_state = propose(small)
            assert jax.tree.map(jnp.shape, small_state) == jax.tree.map(jnp.shape, state)
            want = keep_best(full, bucket)[0]
            assert all(_paths(keep_best(tree, bucket)[0], r) == _paths(want, r) for r in range(rows))
            sizes = tuple(t for t in (1, 2, 4, 8) if t <= 2 * bucket)
            active = jnp.ones(rows, bool)
            np.testing.assert_allclose(claims_by_size(tree, active, sizes), claims_by_size(full, active, sizes),
                                       rtol=1e-6)
        first_nodes = TokenRecyclingDrafter(V, capacity=4, table=table, table_probs=probs)  # the control
        differs |= any(_paths(keep_best(propose(first_nodes)[0], 2)[0], r) != _paths(keep_best(full, 2)[0], r)
                       for r in range(rows))
    assert differs


def test_plain_steps_count_how_often_the_recycled_guess_was_the_emitted_token():
    """Under the auto size each plain step checks Token Recycling's one-node draft (the root's top
    successor in the table *before* the step) against the token the step emitted, in the device loop.
    Recomputed on the host step by step. Control: the table after the step nearly always agrees (a
    greedy row writes its emitted token as the root's top successor), so it would overclaim."""
    drafter = TokenRecyclingDrafter(V, capacity=24)
    engine = Engine(TARGET, drafter, max_draft_capacity=2, attention="xla")
    engine.generate(PROMPTS[:2], 12)  # a table that knows part of what follows
    greedy = {"temperature": np.zeros(len(PROMPTS)), "top_k": np.zeros(len(PROMPTS), np.int32),
              "top_p": np.ones(len(PROMPTS))}
    batch = device_loop.prepare_device_batch(engine, PROMPTS, 24, greedy, 2, (), 0)
    dstate = drafter.prefill(None, drafter.init_state(batch.rows, batch.max_len), None, None, batch.first)
    loop = device_loop.LoopState.start(batch.state, dstate, 24, n_buckets=3, first=batch.first)
    loop = dataclasses.replace(loop, shadow=jnp.zeros(2, jnp.int32))
    hits = after_hits = guessed = 0
    for _ in range(12):
        table, roots = np.asarray(loop.dstate.table), np.asarray(loop.state.last_tokens)
        active, before = ~np.asarray(loop.state.finished), np.asarray(loop.out_len)
        loop = device_loop.run_steps(TARGET.params, None, loop, jnp.int32(1), drafter=drafter, cfg=TARGET.config,
                                     attention="xla", with_q=False, capacity=0, buckets=(0, 1, 2))
        emitted = np.asarray(loop.out_tokens)[np.arange(batch.rows), np.minimum(before, 23)]
        guess, after = table[roots, 0], np.asarray(loop.dstate.table)[roots, 0]
        hits += int(np.sum(active & (guess >= 0) & (guess == emitted)))
        after_hits += int(np.sum(active & (after == emitted)))
        guessed += int(active.sum())
    assert np.asarray(loop.shadow).tolist() == [hits, guessed]
    assert 0 < hits < guessed and after_hits > hits


class WrongGuesses(WrongDrafter):
    """The always-wrong drafter with a free first guess (the token plain decoding never emits)."""

    def first_guess(self, params, dstate, root_tokens):
        return jnp.full(root_tokens.shape, self.never, jnp.int32), jnp.ones(root_tokens.shape, bool)


def test_a_drafter_whose_first_guesses_are_always_wrong_never_probes():
    engine = Engine(TARGET, WrongGuesses(NEVER), max_draft_capacity=2, attention="xla")
    first = engine.generate(PROMPTS, 64)  # measures plain steps and the smallest tree
    (policy,) = engine._chunk_policies.values()
    measured = len(policy.history)
    second = engine.generate(PROMPTS, 64)
    assert [r.token_ids for r in first] == [r.token_ids for r in second] == EXPECTED
    assert policy.shadow == 0.0 and speculative_share(policy.history[measured:]) == 0.0


def test_eagle3_catches_up_on_plain_chunks_as_if_fed_step_by_step(monkeypatch, tmp_path):
    """Under the auto size a plain chunk leaves the EAGLE-3 head alone and only keeps the target's
    features; ``catch_up`` feeds them before the next tree. The head then drafts exactly as one fed
    on every plain step (the same accepted drafts per pass). Control: a catch-up fed zero features
    drafts otherwise. The head is trained a little (a random one is never accepted)."""
    from specjax.drafters.eagle3 import Eagle3Drafter, load_eagle3
    from specjax.drafters.training import TrainOptions, train_drafter

    target = tiny_model(4, vocab=V, layers=4)
    expected = greedy_generate(target, PROMPTS, NEW_TOKENS)
    train_drafter(target, "eagle3", "online", 60, str(tmp_path), prompts=PROMPTS, progress=False,
                  options=TrainOptions(batch_size=4, seq_len=48, ttt_steps=3, save_every=1000))
    trained = load_eagle3(str(tmp_path), target, dtype=jnp.float32, capacity=8, topk=2, depth=3)

    class SteppedHead(Eagle3Drafter):  # no catch_up: fed on every step, plain ones too
        catch_up = property(lambda self: (_ for _ in ()).throw(AttributeError("catch_up")))

    class BlindCatchUp(Eagle3Drafter):
        def catch_up(self, params, dstate, tokens, num, hidden):
            return super().catch_up(params, dstate, tokens, num, jnp.zeros_like(hidden))

    def accepted_per_pass(cls):
        schedule = [0, 0, 2, 0, 2, 2, 0, 2]
        real_policy = device_loop.chunk_policy

        def fixed(*args):
            policy = real_policy(*args)
            policy.choose = lambda: schedule.pop(0) if schedule else 2
            return policy

        monkeypatch.setattr(device_loop, "chunk_policy", fixed)
        head = cls(trained.cfg, trained.params, trained.target_num_layers, capacity=8, topk=2, depth=3)
        engine = Engine(target, head, max_draft_capacity=2, attention="xla")
        results = device_loop.generate_on_device(engine, PROMPTS, NEW_TOKENS, steps_per_sync=3, auto=True,
                                                 max_capacity=2)
        assert [r.token_ids for r in results] == expected
        return [[(s.capacity, s.accepted) for s in r.trace] for r in results]

    caught_up = accepted_per_pass(Eagle3Drafter)
    assert caught_up == accepted_per_pass(SteppedHead)
    assert sum(a for row in caught_up for _, a in row) > 0  # the head's drafts were accepted at all
    assert accepted_per_pass(BlindCatchUp) != caught_up
